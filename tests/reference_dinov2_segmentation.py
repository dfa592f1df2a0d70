# Reference copy, for tests only: DINOv2's linear segmentation head and the mmsegmentation 0.x code it runs in.
#
# BNHead: dinov2/eval/segmentation/models/decode_heads/linear_head.py (facebookresearch/dinov2, commit b8931f7)
#   Copyright (c) Meta Platforms, Inc. and affiliates.
#   This source code is licensed under the Apache License, Version 2.0
#   found in the LICENSE file in the root directory of this source tree.
#
# BaseDecodeHead (the parts BNHead uses), resize, CrossEntropyLoss's reduction, intersect_and_union and
# total_area_to_metrics: mmsegmentation 0.x (mmseg/models/decode_heads/decode_head.py, mmseg/ops/wrappers.py,
# mmseg/models/losses/cross_entropy_loss.py, mmseg/core/evaluation/metrics.py)
#   Copyright (c) OpenMMLab. All rights reserved.
#   Licensed under the Apache License, Version 2.0.
#
# Changes: the mmcv/mmseg registries, configs and file reading are left out; nn.SyncBatchNorm becomes
# nn.BatchNorm2d (one process, same arithmetic); the classes are plain nn.Modules. The arithmetic is unchanged.
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(input, size=None, scale_factor=None, mode='nearest', align_corners=None, warning=True):
    return F.interpolate(input, size, scale_factor, mode, align_corners)


class BaseDecodeHead(nn.Module):
    def __init__(self, in_channels, channels, *, num_classes, dropout_ratio=0.1, in_index=-1,
                 input_transform=None, ignore_index=255, align_corners=False):
        super().__init__()
        self._init_inputs(in_channels, in_index, input_transform)
        self.channels = channels
        self.num_classes = num_classes
        self.dropout_ratio = dropout_ratio
        self.in_index = in_index
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        if dropout_ratio > 0:
            self.dropout = nn.Dropout2d(dropout_ratio)
        else:
            self.dropout = None
        # init_weights: normal_init(self.conv_seg, mean=0, std=0.01)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.constant_(self.conv_seg.bias, 0)

    def _init_inputs(self, in_channels, in_index, input_transform):
        if input_transform is not None:
            assert input_transform in ['resize_concat', 'multiple_select']
        self.input_transform = input_transform
        self.in_index = in_index
        if input_transform is not None:
            assert isinstance(in_channels, (list, tuple))
            assert isinstance(in_index, (list, tuple))
            assert len(in_channels) == len(in_index)
            if input_transform == 'resize_concat':
                self.in_channels = sum(in_channels)
            else:
                self.in_channels = in_channels
        else:
            assert isinstance(in_channels, int)
            assert isinstance(in_index, int)
            self.in_channels = in_channels

    def cls_seg(self, feat):
        """Classify each pixel."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        output = self.conv_seg(feat)
        return output

    def losses(self, seg_logit, seg_label):
        """Compute segmentation loss (CrossEntropyLoss, use_sigmoid False, loss_weight 1, avg_non_ignore False)."""
        seg_logit = resize(input=seg_logit, size=seg_label.shape[2:], mode='bilinear',
                           align_corners=self.align_corners)
        seg_label = seg_label.squeeze(1)
        loss = F.cross_entropy(seg_logit, seg_label, weight=None, reduction='none', ignore_index=self.ignore_index)
        # weight_reduce_loss(loss, weight=None, reduction='mean', avg_factor=None)
        return loss.mean()


class BNHead(BaseDecodeHead):
    """Just a batchnorm."""

    def __init__(self, resize_factors=None, **kwargs):
        super().__init__(**kwargs)
        assert self.in_channels == self.channels
        self.bn = nn.BatchNorm2d(self.in_channels)
        self.resize_factors = resize_factors

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        feats = self.bn(x)
        return feats

    def _transform_inputs(self, inputs):
        if self.input_transform == "resize_concat":
            # accept lists (for cls token)
            input_list = []
            for x in inputs:
                if isinstance(x, list):
                    input_list.extend(x)
                else:
                    input_list.append(x)
            inputs = input_list
            # an image descriptor can be a local descriptor with resolution 1x1
            for i, x in enumerate(inputs):
                if len(x.shape) == 2:
                    inputs[i] = x[:, :, None, None]
            # select indices
            inputs = [inputs[i] for i in self.in_index]
            # Resizing shenanigans
            if self.resize_factors is not None:
                assert len(self.resize_factors) == len(inputs), (len(self.resize_factors), len(inputs))
                inputs = [
                    resize(input=x, scale_factor=f, mode="bilinear" if f >= 1 else "area")
                    for x, f in zip(inputs, self.resize_factors)
                ]
            upsampled_inputs = [
                resize(input=x, size=inputs[0].shape[2:], mode="bilinear", align_corners=self.align_corners)
                for x in inputs
            ]
            inputs = torch.cat(upsampled_inputs, dim=1)
        elif self.input_transform == "multiple_select":
            inputs = [inputs[i] for i in self.in_index]
        else:
            inputs = inputs[self.in_index]

        return inputs

    def forward(self, inputs):
        """Forward function."""
        output = self._forward_feature(inputs)
        output = self.cls_seg(output)
        return output


def make_bn_head(embed_dim, layers, num_classes):
    """DINOv2's ADE20K linear (layers=1) and "+ms" (layers=4) head configs: in_index over the backbone's
    outputs, input_transform resize_concat, channels = the concatenated width, dropout 0, align_corners False."""
    in_index = [0] if layers == 1 else [0, 1, 2, 3]
    return BNHead(in_channels=[embed_dim] * len(in_index), in_index=in_index, input_transform="resize_concat",
                  channels=embed_dim * len(in_index), dropout_ratio=0, num_classes=num_classes, align_corners=False)


def intersect_and_union(pred_label, label, num_classes, ignore_index, label_map=dict(), reduce_zero_label=False):
    pred_label = torch.from_numpy(pred_label)
    label = torch.from_numpy(label)
    if label_map is not None:
        label_copy = label.clone()
        for old_id, new_id in label_map.items():
            label[label_copy == old_id] = new_id
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255

    mask = (label != ignore_index)
    pred_label = pred_label[mask]
    label = label[mask]

    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_pred_label = torch.histc(pred_label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_label = torch.histc(label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def total_intersect_and_union(results, gt_seg_maps, num_classes, ignore_index, label_map=dict(),
                              reduce_zero_label=False):
    total_area_intersect = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_union = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_pred_label = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_label = torch.zeros((num_classes, ), dtype=torch.float64)
    for result, gt_seg_map in zip(results, gt_seg_maps):
        area_intersect, area_union, area_pred_label, area_label = intersect_and_union(
            result, gt_seg_map, num_classes, ignore_index, label_map, reduce_zero_label)
        total_area_intersect += area_intersect
        total_area_union += area_union
        total_area_pred_label += area_pred_label
        total_area_label += area_label
    return total_area_intersect, total_area_union, total_area_pred_label, total_area_label


def total_area_to_metrics(total_area_intersect, total_area_union, total_area_pred_label, total_area_label,
                          metrics=['mIoU'], nan_to_num=None, beta=1):
    all_acc = total_area_intersect.sum() / total_area_label.sum()
    ret_metrics = OrderedDict({'aAcc': all_acc})
    for metric in metrics:
        if metric == 'mIoU':
            iou = total_area_intersect / total_area_union
            acc = total_area_intersect / total_area_label
            ret_metrics['IoU'] = iou
            ret_metrics['Acc'] = acc
    ret_metrics = {metric: value.numpy() for metric, value in ret_metrics.items()}
    if nan_to_num is not None:
        ret_metrics = OrderedDict({metric: np.nan_to_num(metric_value, nan=nan_to_num)
                                   for metric, metric_value in ret_metrics.items()})
    return ret_metrics


def summary(ret_metrics):
    """The dataset-level figures mmseg's CustomDataset.evaluate prints: np.round(np.nanmean(value) * 100, 2)."""
    return {("m" + k if k != "aAcc" else k): np.round(np.nanmean(v) * 100, 2) for k, v in ret_metrics.items()}
