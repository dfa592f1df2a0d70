"""The whole training loop against the official one: same weights in, same weights out.

Our `main_dino.build_training` + `main_dino.dino_step` / `ema_update` in `engine.train_one_epoch` and the official loop (rebuilt from
tests/official_dino.py: explicit attention, weight_norm head, per-pair loss, per-parameter clipping,
cancelled last-layer gradients, torch AdamW, Python-loop EMA) run the same steps on the same batches,
across the frozen-last-layer epoch and the next one. Any difference in schedules, clipping, freezing,
weight decay groups, EMA or loss shows up in the final student and teacher weights.
"""
import warnings

import official_dino as ref  # the reference beside this file (pytest puts tests/ on sys.path)
import torch

import engine
import main_dino


def test_training_loop_matches_official_over_two_epochs():
    torch.manual_seed(0)
    epochs, steps, batch, out_dim = 4, 3, 4, 128
    args = main_dino.get_args_parser().parse_args([
        "--arch", "vit_tiny", "--patch_size", "8", "--out_dim", str(out_dim), "--batch_size_per_gpu", str(batch),
        "--epochs", str(epochs), "--warmup_epochs", "1", "--local_crops_number", "2", "--global_crops_size", "32",
        "--local_crops_size", "16", "--drop_path_rate", "0", "--lr", "0.05", "--clip_grad", "0.5",
        "--print_freq", "100", "--warmup_teacher_temp_epochs", "2", "--warmup_teacher_temp", "0.02",
        "--teacher_temp", "0.05", "--momentum_teacher", "0.9"])
    args.device, args.rank, args.world_size, args.gpu = torch.device("cpu"), 0, 1, 0
    ours = main_dino.build_training(args, niter_per_ep=steps)
    initial_student = {k: v.clone() for k, v in ours.student.state_dict().items()}

    # The official modules, with our initial weights (same keys).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = ref.MultiCropWrapper(ref.vit_tiny(patch_size=8), ref.DINOHead(192, out_dim))
        teacher = ref.MultiCropWrapper(ref.vit_tiny(patch_size=8), ref.DINOHead(192, out_dim))
    student.load_state_dict(ours.student.state_dict(), strict=True)
    teacher.load_state_dict(ours.teacher.state_dict(), strict=True)
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = ref.DINOLoss(out_dim, 4, args.warmup_teacher_temp, args.teacher_temp,
                             args.warmup_teacher_temp_epochs, epochs)
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    lr_schedule = ref.cosine_scheduler(args.lr * batch / 256., args.min_lr, epochs, steps,
                                       warmup_epochs=args.warmup_epochs)
    wd_schedule = ref.cosine_scheduler(args.weight_decay, args.weight_decay_end, epochs, steps)
    momentum_schedule = ref.cosine_scheduler(args.momentum_teacher, 1, epochs, steps)

    g = torch.Generator().manual_seed(1)
    data = [[[torch.randn(batch, 3, s, s, generator=g) for s in (32, 32, 16, 16)] for _ in range(steps)]
            for _ in range(2)]
    for epoch in range(2):  # epoch 0 has the last layer frozen, epoch 1 trains it
        loader = [(images, torch.zeros(batch), [""] * batch) for images in data[epoch]]
        step = main_dino.dino_step(ours.student, ours.teacher, ours.teacher_without_ddp, ours.dino_loss)
        after_step = main_dino.ema_update(ours.student, ours.teacher_without_ddp, ours.momentum_schedule)
        engine.train_one_epoch(step, ours.student, ours.optimizer, loader, ours.lr_schedule, ours.wd_schedule, epoch,
                               args, after_step=after_step)
        official_loader = [(images, labels) for images, labels, _ in loader]
        ref.train_one_epoch(student, teacher, teacher, dino_loss, official_loader, optimizer, lr_schedule, wd_schedule,
                            momentum_schedule, epoch, None, args.clip_grad, args.freeze_last_layer)

    torch.testing.assert_close(ours.dino_loss.center, dino_loss.center, rtol=1e-4, atol=1e-6)
    for name, (ours_model, official_model) in {"student": (ours.student, student),
                                               "teacher": (ours.teacher, teacher)}.items():
        official_state = official_model.state_dict()
        for key, value in ours_model.state_dict().items():
            expected = official_state[key]
            if key.endswith("attn.qkv.bias"):
                # The key bias has a zero gradient in exact arithmetic (softmax ignores a constant shift of
                # the scores), so its gradient is rounding noise, which Adam scales up to steps of size lr:
                # compare the query and value biases only.
                dim = value.shape[0] // 3
                value, expected = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([expected[:dim], expected[2 * dim:]])
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{name}.{key}: {m}")
    # the weights did move (the last layer too, after its frozen epoch): not two untouched initialisations
    for key in ("backbone.blocks.0.mlp.fc1.weight", "head.last_layer.weight_v"):
        assert (ours.student.state_dict()[key] - initial_student[key]).abs().max() > 1e-4, key
