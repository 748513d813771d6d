"""Rank synthetic images by how many dots they show, with the ranking-aware CLIP adapter.

A small CLIPModel (random weights, nothing downloaded) is frozen and given SHiRA (or 1-bit LoRA)
adapters in its encoders, a learnable prompt for the instruction "how many dots", a regression
head and the auxiliary ranking-aware attention branch (shira_kernels.methods.ranking_clip).
It is trained with a ranking loss on lists of images of 1..10 dots (random cells, sizes and
colours, rendered with torch), and Kendall's tau between predicted scores and true counts is
measured on held-out lists before and after training (chance: about 0).

    python examples/ranking_clip.py [--quick] [--seed N] [--adapter shira|binary]
                                    [--loss ranknet|listmle] [--aux-weight W] [--steps N]

The last line printed is the verdict. ``main(argv)`` returns the figures as a dict (the tests
run the quick mode in-process).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("SHIRA_KERNELS_TUNE", "off")  # no strategy timing at start-up: a toy run

import torch  # noqa: E402

from shira_kernels.methods.ranking_clip import (  # noqa: E402
    ADAPTERS, LOSSES, HashTokenizer, RankingCLIPAdapter, kendall_tau)

INSTRUCTION = "how many dots"
IMAGE_SIZE, GRID, MAX_DOTS = 32, 4, 10
VOCAB = 64


def render_dots(counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [len(counts), 3, 32, 32] with counts[i] dots each: each dot in its own cell of a
    4x4 grid (chosen at random), jittered, with a random radius and colour, on a noisy dark
    background. Values roughly in [-1, 1]."""
    n = counts.numel()
    cell = IMAGE_SIZE / GRID
    order = torch.rand(n, GRID * GRID, generator=generator).argsort(dim=1)
    used = torch.arange(GRID * GRID).unsqueeze(0) < counts.unsqueeze(1)  # the order's first k
    cells = torch.zeros(n, GRID * GRID, dtype=torch.bool).scatter(1, order, used)
    radius = 1.0 + 2.4 * torch.rand(n, GRID * GRID, generator=generator)
    room = cell - 2 * radius.unsqueeze(-1)  # how far a dot can move and stay in its cell
    jitter = (torch.rand(n, GRID * GRID, 2, generator=generator) - 0.5) * room
    index = torch.arange(GRID * GRID)
    centres = torch.stack([index // GRID, index % GRID], -1).float() * cell + cell / 2 + jitter
    colours = 0.4 + 0.6 * torch.rand(n, GRID * GRID, 3, generator=generator)
    ys = torch.arange(IMAGE_SIZE).float() + 0.5
    dy = ys.view(1, 1, -1, 1) - centres[..., 0].view(n, -1, 1, 1)
    dx = ys.view(1, 1, 1, -1) - centres[..., 1].view(n, -1, 1, 1)
    distance = (dy ** 2 + dx ** 2).sqrt()
    coverage = (radius.view(n, -1, 1, 1) + 0.5 - distance).clamp(0, 1) * cells.view(n, -1, 1, 1)
    dots = torch.einsum("nkhw,nkc->nchw", coverage, colours)
    background = 0.35 * torch.rand(n, 3, 1, 1, generator=generator)
    noise = 0.05 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return (background + dots + noise).clamp(0, 1) * 2 - 1


def sample_lists(lists: int, size: int, generator: torch.Generator):
    """(images [lists, size, 3, 32, 32], counts [lists, size]): distinct counts per list."""
    counts = torch.rand(lists, MAX_DOTS, generator=generator).argsort(dim=1)[:, :size] + 1
    images = render_dots(counts.reshape(-1), generator)
    return images.reshape(lists, size, 3, IMAGE_SIZE, IMAGE_SIZE), counts


def small_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel
    tokenizer = HashTokenizer(VOCAB)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=64)
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tokenizer


@torch.no_grad()
def held_out_tau(model: RankingCLIPAdapter, images: torch.Tensor, counts: torch.Tensor) -> float:
    scores = model.score(images, INSTRUCTION)
    return float(kendall_tau(scores, counts.float()).mean())


def train(model: RankingCLIPAdapter, steps: int, generator: torch.Generator, label: str) -> None:
    """AdamW on the model's trainable parameters, fresh lists of 6 images (8 lists) per step."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        images, counts = sample_lists(8, 6, generator)
        loss = model.loss(images, INSTRUCTION, counts.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 3) == 0:
            print(f"  {label} step {step:4d}  loss {loss.item():.4f}")
    model.eval()


def keep_only_head_trainable(model: RankingCLIPAdapter) -> None:
    """The ablation: the text-conditioned head alone learns; encoder adapters and prompt stay
    at their start (the adapters then equal the base), and the auxiliary branch is off."""
    for name, param in model.named_parameters():
        if not name.startswith(("head.", "image_norm.", "film.")):
            param.requires_grad_(False)
    model.aux_weight = 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", choices=ADAPTERS, default="shira")
    parser.add_argument("--loss", choices=LOSSES, default="ranknet")
    parser.add_argument("--aux-weight", type=float, default=0.5,
                        help="weight of the auxiliary branch's loss (0: no branch)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: "
                        "150 with --quick, else 600)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (150 if args.quick else 600)
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    threads = torch.get_num_threads()
    # One thread: the model is tiny, and on a shared machine the kernels' extra threads spin.
    torch.set_num_threads(1)
    try:
        return run(args, steps)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, steps: int) -> dict:
    start = time.perf_counter()
    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    test_images, test_counts = sample_lists(48, 8, held_out)
    pixel_sum = (test_images + 1).sum(dim=(-3, -2, -1))
    tau_pixel_sum = float(kendall_tau(pixel_sum, test_counts.float()).mean())

    clip, tokenizer = small_clip(args.seed)
    model = RankingCLIPAdapter(clip, adapter=args.adapter, r=4, n_prompt=4, seed=args.seed,
                               loss=args.loss, aux_weight=args.aux_weight, tokenizer=tokenizer)
    model.eval()
    tau_before = held_out_tau(model, test_images, test_counts)
    print(f"adapter {args.adapter}, loss {args.loss}, aux weight {args.aux_weight}, seed "
          f"{args.seed}: held-out Kendall tau (48 lists of 8 images, "
          f"1..{MAX_DOTS} dots; chance ~0) before training {tau_before:+.3f}")
    train(model, steps, torch.Generator().manual_seed(args.seed), "adapted")
    tau_after = held_out_tau(model, test_images, test_counts)

    clip, _ = small_clip(args.seed)
    head_only = RankingCLIPAdapter(clip, adapter=args.adapter, r=4, n_prompt=4, seed=args.seed,
                                   loss=args.loss, tokenizer=tokenizer)
    keep_only_head_trainable(head_only)
    train(head_only, steps, torch.Generator().manual_seed(args.seed), "head only")
    tau_head_only = held_out_tau(head_only, test_images, test_counts)
    seconds = time.perf_counter() - start

    trainable = sum(p.numel() for p in model.trainable_parameters())
    base = sum(p.numel() for p in model.base_parameters().values())
    print(f"references: sum of pixel values {tau_pixel_sum:+.3f}; head alone on the frozen CLIP "
          f"{tau_head_only:+.3f}")
    print(f"held-out Kendall tau after {steps} steps: {tau_after:+.3f} ({trainable} trainable of "
          f"{trainable + base} parameters, {seconds:.1f} s)")
    passed = tau_after >= 0.5 and tau_after > tau_before + 0.3
    verdict = "PASS" if passed else "FAIL"
    print(f"{verdict}: held-out tau {tau_before:+.3f} -> {tau_after:+.3f} (pass: >= 0.5 and at "
          "least 0.3 above the untrained model)")
    return dict(adapter=args.adapter, loss=args.loss, aux_weight=args.aux_weight, seed=args.seed,
                steps=steps, tau_before=tau_before,
                tau_after=tau_after, tau_head_only=tau_head_only, tau_pixel_sum=tau_pixel_sum,
                trainable=trainable, base=base, seconds=seconds, passed=passed)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
