"""FlowGMM on scikit-learn's digits: a generative classifier against GaussianNB and QDA.

Fixed stratified 80/20 split (seed 0); 10% of the training images are held out to pick
the epoch (best validation accuracy). Rows:

- supervised: FlowGMM (log p(x, y)), scikit-learn's GaussianNB and QDA (their shipped
  generative classifiers; QDA's shrinkage chosen by 5-fold CV) on the same pixels; test
  accuracy, test bits per dimension of the dequantized pixels (FlowGMM; one uniform-noise
  draw, seed 0) and time;
- semi-supervised: 10% of the training labels, the rest unlabelled (log p(x, y) +
  0.1 log p(x); with weight 1 the unlabelled term swamps the few labels and the classes
  drift, on the validation split), against the same FlowGMM trained on the labelled 10%
  alone with as many steps.

Writes ``samples.png`` (class-conditional samples, one row per digit), ``moons.png``
(FlowGMM on two moons: class densities, predictions and samples) and ``report.json``.

    python -m inference.bench.flow_gmm --out bench-out/flow_gmm
    python -m inference.bench.flow_gmm --epochs 2 --skip-semi      # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from inference.flow_gmm import evaluate_flow_gmm, fit_flow_gmm
from pyro_cwm.data.digits import Dequantize, load_digits_split
from pyro_cwm.models.flow_gmm import FlowGMM


def split_validation(x, y, fraction: float, seed: int):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(round(fraction * len(x)))
    return x[perm[n:]], y[perm[n:]], x[perm[:n]], y[perm[:n]]


def test_bits_per_dim(model: FlowGMM, dequantize: Dequantize, x: torch.Tensor) -> float:
    param = next(model.parameters())
    z, log_det = dequantize.with_log_det(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_p = model.log_prob(z.to(param.device, param.dtype)).cpu() + log_det
    return (-log_p.mean() / (x.shape[1] * math.log(2))).item()


def train(args, x, y, x_unlabeled=None, epochs=None, validation=None, unlabeled_weight=1.0):
    torch.manual_seed(args.seed)
    model = FlowGMM(
        x.shape[1], 10, transforms=args.transforms, hidden_features=(args.hidden,) * 2,
        mean_scale=args.mean_scale,
    ).to(args.device)
    history = fit_flow_gmm(
        model, x, y, x_unlabeled=x_unlabeled, epochs=epochs or args.epochs,
        batch_size=args.batch_size, lr=args.lr, preprocess=Dequantize(),
        validation=validation, seed=args.seed, progress=not args.no_progress,
        unlabeled_weight=unlabeled_weight,
    )
    return model, history


def save_samples(model: FlowGMM, path: Path, per_class: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dequantize = Dequantize()
    fig, axes = plt.subplots(10, per_class, figsize=(per_class, 10))
    torch.manual_seed(0)
    for digit in range(10):
        x, _ = model.sample(per_class, digit)
        pixels = dequantize.to_pixels(x.float().cpu())
        for j in range(per_class):
            axes[digit, j].imshow(pixels[j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
            axes[digit, j].axis("off")
    fig.suptitle("FlowGMM class-conditional samples (one row per digit)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_moons(args, path: Path) -> float:
    """FlowGMM on two moons: points coloured by predicted class over the class densities.

    Returns the held-out accuracy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_cwm.data.toy import two_moons

    x, y = two_moons(1200, seed=args.seed, return_labels=True)
    torch.manual_seed(args.seed)
    model = FlowGMM(2, 2, transforms=3, hidden_features=(64, 64), mean_scale=4.0)
    fit_flow_gmm(model, x[:1000], y[:1000], epochs=40, lr=3e-3, validation=(x[1000:], y[1000:]),
                 seed=args.seed, progress=not args.no_progress)
    accuracy = evaluate_flow_gmm(model, x[1000:], y[1000:])["accuracy"]
    xs, ys = torch.linspace(-1.5, 2.5, 200), torch.linspace(-1.0, 1.5, 160)
    grid = torch.cartesian_prod(xs, ys)
    with torch.no_grad():
        joint = model.joint_log_probs(grid).exp().reshape(200, 160, 2)
        predicted = model.predict(x)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, cmap in enumerate(["Blues", "Oranges"]):
        axes[0].contour(xs, ys, joint[..., k].T, levels=6, cmap=cmap)
    axes[0].scatter(x[:, 0], x[:, 1], c=predicted, s=3, cmap="coolwarm")
    axes[0].set_title(f"p(x, y) per class, points by predicted class (acc {accuracy:.3f})")
    samples = [model.sample(300, k)[0] for k in range(2)]
    for k, color in enumerate(["tab:blue", "tab:orange"]):
        axes[1].scatter(samples[k][:, 0], samples[k][:, 1], s=3, color=color, label=f"y={k}")
    axes[1].legend()
    axes[1].set_xlim(axes[0].get_xlim())
    axes[1].set_ylim(axes[0].get_ylim())
    axes[1].set_title("class-conditional samples")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return accuracy


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--transforms", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mean-scale", type=float, default=16.0)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument(
        "--unlabeled-weight", type=float, default=0.1,
        help="weight of the unlabelled log p(x) term (0.1 beat 1 on the validation split)",
    )
    parser.add_argument("--skip-semi", action="store_true", help="no semi-supervised rows")
    parser.add_argument("--skip-moons", action="store_true", help="no two-moons plot")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-out/flow_gmm"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.model_selection import GridSearchCV
    from sklearn.naive_bayes import GaussianNB

    x_all, y_all, x_test, y_test = load_digits_split(seed=args.seed)
    x_train, y_train, x_val, y_val = split_validation(x_all, y_all, 0.1, args.seed)
    rows = []

    def row(setting, method, accuracy, seconds, bpd=None, labels=None):
        rows.append({"setting": setting, "method": method, "test_accuracy": accuracy,
                     "test_bits_per_dim": bpd, "labelled": labels, "time_s": seconds})
        print(json.dumps(rows[-1]), flush=True)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    started = time.perf_counter()
    model, history = train(args, x_train, y_train, validation=(x_val, y_val))
    scores = evaluate_flow_gmm(model, x_test.to(args.device), y_test.to(args.device),
                               preprocess=Dequantize())
    row("supervised", "FlowGMM", scores["accuracy"], time.perf_counter() - started,
        test_bits_per_dim(model, Dequantize(), x_test), len(x_train))
    args.out.mkdir(parents=True, exist_ok=True)
    save_samples(model, args.out / "samples.png")
    # QDA needs shrinkage on digits (constant border pixels): reg_param by 5-fold CV.
    qda = GridSearchCV(QuadraticDiscriminantAnalysis(), {"reg_param": [0.01, 0.1, 0.3, 0.6]})
    for name, classifier in [("GaussianNB", GaussianNB()), ("QDA (reg_param by CV)", qda)]:
        started = time.perf_counter()
        classifier.fit(x_all.numpy(), y_all.numpy())
        accuracy = float((classifier.predict(x_test.numpy()) == y_test.numpy()).mean())
        row("supervised", name, accuracy, time.perf_counter() - started, labels=len(x_all))

    if not args.skip_moons:
        started = time.perf_counter()
        accuracy = plot_moons(args, args.out / "moons.png")
        row("two moons (2-D)", "FlowGMM", accuracy, time.perf_counter() - started, labels=1000)

    if not args.skip_semi:
        g = torch.Generator().manual_seed(args.seed)
        labelled = torch.cat([
            torch.nonzero(y_train == c).squeeze(1)[
                torch.randperm(int((y_train == c).sum()), generator=g)
            ][: max(1, round(args.label_fraction * int((y_train == c).sum())))]
            for c in range(10)
        ])
        mask = torch.zeros(len(x_train), dtype=torch.bool)
        mask[labelled] = True
        x_l, y_l, x_u = x_train[mask], y_train[mask], x_train[~mask]
        started = time.perf_counter()
        semi, _ = train(args, x_l, y_l, x_unlabeled=x_u, validation=(x_val, y_val),
                        unlabeled_weight=args.unlabeled_weight)
        scores = evaluate_flow_gmm(semi, x_test.to(args.device), y_test.to(args.device),
                                   preprocess=Dequantize())
        row("semi-supervised", "FlowGMM (labelled + unlabelled)", scores["accuracy"],
            time.perf_counter() - started, test_bits_per_dim(semi, Dequantize(), x_test),
            int(mask.sum()))
        # The same number of optimizer steps on the labelled images alone.
        steps = math.ceil(len(x_train) / args.batch_size) * args.epochs
        epochs = max(1, round(steps / math.ceil(len(x_l) / args.batch_size)))
        started = time.perf_counter()
        alone, _ = train(args, x_l, y_l, epochs=epochs, validation=(x_val, y_val))
        scores = evaluate_flow_gmm(alone, x_test.to(args.device), y_test.to(args.device),
                                   preprocess=Dequantize())
        row("semi-supervised", "FlowGMM (labelled only)", scores["accuracy"],
            time.perf_counter() - started, test_bits_per_dim(alone, Dequantize(), x_test),
            int(mask.sum()))

    (args.out / "report.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                      "rows": rows}, indent=1))
    print("\n| setting | method | labelled | test accuracy | test bits/dim | s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        bpd = f"{r['test_bits_per_dim']:.3f}" if r["test_bits_per_dim"] is not None else "-"
        print(f"| {r['setting']} | {r['method']} | {r['labelled']} | "
              f"{r['test_accuracy']:.4f} | {bpd} | {r['time_s']:.1f} |")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
