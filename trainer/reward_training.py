"""Training and evaluation of the learned alignment reward (Lee et al. 2023).

    rewardfleet train-reward                                   # synthetic testbed (built on first use), CPU
    rewardfleet train-reward --config my.yaml --set lambda_cls=0

Loss, over a batch of feedback (image x, prompt z, label y in {0, 1}), with r = sigmoid(head(CLIP(x), CLIP(z))):
    MSE(r(x, z), y) + lambda_cls * CE(softmax_j(r(x, z_j) / T), j = 0)
The second term is the paper's prompt-classification augmentation. For each positive sample whose prompt has
attributes, z_0 is the true prompt and z_1..z_{N-1} are prompts that change one attribute (count, color or
background). CLIP is frozen: its embeddings are computed once, and only the head trains.

Evaluation is on held-out feedback whose prompts never appear in training. It reports accuracy and AUC of the
learned reward against the CLIP-score baseline (cosine of the same CLIP's embeddings), each with its decision
threshold chosen on the training feedback. The ROC curves are written to a PNG.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.config import resolve_model_source
from services.rewards.alignment import HeadConfig, build_head, clip_embeddings, head_logits, save_alignment_model
from trainer.feedback import FeedbackSample, load_feedback, load_images


@dataclass(frozen=True)
class RewardTrainingConfig:
    # Where the trained reward directory (alignment_reward.json, head.safetensors, metrics, ROC plot) goes.
    out_dir: str = "runs/alignment_reward"
    # Build the synthetic feedback testbed here (once) and train on it; None = use feedback/val_feedback/clip.
    testbed: str | None = "runs/testbed"
    # Training feedback JSONL (when testbed is None).
    feedback: str | None = None
    # Held-out feedback JSONL; None = hold out val_fraction of the training prompts (split by prompt).
    val_feedback: str | None = None
    val_fraction: float = 0.2
    # The frozen CLIP (when testbed is None): hub id or local directory.
    clip: str = "openai/clip-vit-large-patch14"
    device: str = "cpu"
    # MLP head: hidden widths and dropout.
    hidden_sizes: tuple[int, ...] = (128, 32)
    dropout: float = 0.1
    # AdamW.
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    # At most this many epochs; stop after `patience` epochs without a better held-out loss.
    epochs: int = 100
    patience: int = 15
    # lambda: weight of the prompt-classification loss (0 = plain MSE, no augmentation).
    lambda_cls: float = 0.5
    # N: prompts per classification (the true one + N - 1 perturbations).
    num_prompts: int = 4
    # T: temperature of the classification logits r(x, z_j) / T (r is in [0, 1], so T < 1 sharpens).
    temperature: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.testbed is None and self.feedback is None:
            raise ValueError("set `testbed` (a directory) or `feedback` (a JSONL)")
        if self.num_prompts < 2:
            raise ValueError(
                f"num_prompts must be >= 2 (the true prompt and at least one other), got {self.num_prompts}"
            )
        if self.temperature <= 0 or self.lambda_cls < 0:
            raise ValueError("temperature must be > 0 and lambda_cls >= 0")


def alignment_loss(head, image_emb, text_emb, labels, aug_text_emb=None, lambda_cls: float = 0.0, temperature=1.0):
    """The training loss and its parts.

    image_emb, text_emb: (B, D) unit-norm CLIP embeddings; labels: (B,) in {0, 1}.
    aug_text_emb: (P, N, D) for the P rows of the batch that get the augmentation (the first P rows), with the true
    prompt at index 0 of N. Returns (loss, {"mse": ..., "cls": ...}).
    """
    import torch

    r = torch.sigmoid(head_logits(head, image_emb, text_emb))  # (B,)
    mse = torch.mean((r - labels.float()) ** 2)
    cls = torch.zeros((), device=mse.device)
    if lambda_cls > 0 and aug_text_emb is not None and len(aug_text_emb):
        p = aug_text_emb.shape[0]
        r_j = torch.sigmoid(head_logits(head, image_emb[:p, None, :], aug_text_emb))  # (P, N)
        target = torch.zeros(p, dtype=torch.long, device=r_j.device)  # the true prompt is candidate 0
        cls = torch.nn.functional.cross_entropy(r_j / temperature, target)
    return mse + lambda_cls * cls, {"mse": float(mse.detach()), "cls": float(cls.detach())}


# --- metrics ------------------------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] == 1
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max(1, (~hits).sum())])
    return fpr, tpr


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (score >= t means good) with the highest accuracy on these scores."""
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    accuracy = [np.mean((scores >= t) == (labels == 1)) for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == (labels == 1)))


# --- data ---------------------------------------------------------------------------------------------------------


def split_by_prompt(samples: list[FeedbackSample], val_fraction: float, seed: int):
    """(train, val) with disjoint prompts: val prompts are never seen in training."""
    prompts = sorted({s.prompt for s in samples})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(prompts)[: max(1, int(round(val_fraction * len(prompts))))])
    return [s for s in samples if s.prompt not in held], [s for s in samples if s.prompt in held]


class _TextCache:
    """CLIP text embeddings by prompt, computed once each (perturbed prompts repeat across epochs)."""

    def __init__(self, clip, processor, device: str):
        self.clip, self.processor, self.device = clip, processor, device
        self.emb: dict[str, Any] = {}

    def __call__(self, texts: list[str]):
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self.emb]
        if new:
            _, emb = clip_embeddings(self.clip, self.processor, None, new, self.device)
            self.emb.update(zip(new, emb, strict=True))
        return torch.stack([self.emb[t] for t in texts])  # (len(texts), D)


def _embed_samples(samples, clip, processor, texts: _TextCache, device: str, batch: int = 128):
    import torch

    images = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        emb, _ = clip_embeddings(clip, processor, load_images(chunk), None, device)
        images.append(emb)
    return torch.cat(images), texts([s.prompt for s in samples])  # (N, D), (N, D)


# --- training -----------------------------------------------------------------------------------------------------


def train_reward(config: RewardTrainingConfig, progress: bool = True) -> dict[str, Any]:
    """Trains the head, evaluates it against the CLIP-score baseline, writes the reward directory; returns eval."""
    import torch

    # The head is a tiny MLP: intra-op threads gain nothing and, on a busy machine, spin-wait (measured: 5x slower
    # with 2 threads while another process used the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_reward(config, progress)
    finally:
        torch.set_num_threads(threads)


def _train_reward(config: RewardTrainingConfig, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import CLIPModel, CLIPProcessor

    from trainer.testbed import perturb, render_prompt

    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data and the frozen CLIP.
    if config.testbed is not None:
        paths = build_testbed_once(config.testbed, config.seed)
        clip_source, train_path, val_path = str(paths["clip"]), paths["train"], paths["val"]
    else:
        clip_source, train_path, val_path = config.clip, config.feedback, config.val_feedback
    train = load_feedback(train_path)
    if val_path is not None:
        val = load_feedback(val_path)
    else:
        train, val = split_by_prompt(train, config.val_fraction, config.seed)
    overlap = {s.prompt for s in train} & {s.prompt for s in val}
    if overlap:
        raise ValueError(f"held-out prompts also appear in training feedback: {sorted(overlap)[:5]}")
    source = resolve_model_source(clip_source, "train-reward")
    clip = CLIPModel.from_pretrained(source).to(config.device).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(source)
    texts = _TextCache(clip, processor, config.device)
    train_img, train_txt = _embed_samples(train, clip, processor, texts, config.device)  # (N, D) each
    val_img, val_txt = _embed_samples(val, clip, processor, texts, config.device)
    train_y = torch.tensor([s.label for s in train], dtype=torch.float32)
    val_y = torch.tensor([s.label for s in val], dtype=torch.float32)

    # 2. The head.
    torch.manual_seed(config.seed)
    head_config = HeadConfig(embed_dim=train_img.shape[1], hidden_sizes=config.hidden_sizes, dropout=config.dropout)
    head = build_head(head_config).to(config.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    augmentable = np.array([s.label == 1 and s.attrs is not None for s in train])

    def val_loss() -> float:
        head.eval()
        with torch.no_grad():
            r = torch.sigmoid(head_logits(head, val_img, val_txt))
        return float(torch.mean((r - val_y) ** 2))

    # 3. Epochs, early stopping on the held-out MSE.
    best, best_state, bad_epochs, history = float("inf"), None, 0, []
    bar = tqdm(range(config.epochs), desc="train-reward", disable=not progress)
    for epoch in bar:
        head.train()
        order = rng.permutation(len(train))
        sums = {"loss": 0.0, "mse": 0.0, "cls": 0.0}
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            # Augmented rows first, as alignment_loss expects.
            idx = np.concatenate([idx[augmentable[idx]], idx[~augmentable[idx]]])
            aug = None
            n_aug = int(augmentable[idx].sum())
            if config.lambda_cls > 0 and n_aug:
                prompts = []
                for i in idx[:n_aug]:
                    attrs = train[i].attrs
                    prompts += [train[i].prompt] + [
                        render_prompt(a) for a in perturb(attrs, rng, config.num_prompts - 1)
                    ]
                aug = texts(prompts).view(n_aug, config.num_prompts, -1)  # (P, N, D)
            loss, parts = alignment_loss(
                head, train_img[idx], train_txt[idx], train_y[idx], aug, config.lambda_cls, config.temperature
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for k, v in (("loss", loss.item()), *parts.items()):
                sums[k] += v * len(idx)
        record = {"epoch": epoch, **{k: v / len(train) for k, v in sums.items()}, "val_mse": val_loss()}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val_mse=f"{record['val_mse']:.4f}")
        if record["val_mse"] < best - 1e-6:
            best, bad_epochs = record["val_mse"], 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()

    # 4. Evaluation on unseen prompts: learned reward vs CLIP score, thresholds chosen on the training feedback.
    with torch.no_grad():
        scores = {
            "learned reward": (
                torch.sigmoid(head_logits(head, train_img, train_txt)).numpy(),
                torch.sigmoid(head_logits(head, val_img, val_txt)).numpy(),
            ),
            "CLIP score": ((train_img * train_txt).sum(-1).numpy(), (val_img * val_txt).sum(-1).numpy()),
        }
    ytr, yva = train_y.numpy(), val_y.numpy()
    evaluation: dict[str, Any] = {
        "train_samples": len(train),
        "val_samples": len(val),
        "val_prompts": len({s.prompt for s in val}),
        "epochs_run": len(history),
        "seconds": round(time.perf_counter() - started, 1),
        "config": asdict(config),
    }
    for name, (s_train, s_val) in scores.items():
        t = best_threshold(s_train, ytr)
        evaluation[name] = {"threshold": t, "accuracy": accuracy(s_val, yva, t), "auc": roc_auc(s_val, yva)}
    evaluation["accuracy_gain_points"] = 100 * (
        evaluation["learned reward"]["accuracy"] - evaluation["CLIP score"]["accuracy"]
    )

    # 5. Outputs: the reward directory (self-contained: a local CLIP is copied in), metrics, ROC plot.
    if Path(source).is_dir():
        shutil.copytree(source, out / "clip", dirs_exist_ok=True)
        clip_ref = "clip"
    else:
        clip_ref = clip_source
    save_alignment_model(out, clip_ref, head, head_config, evaluation=evaluation)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
    plot_roc({name: (s_val, yva) for name, (_, s_val) in scores.items()}, out / "roc.png")
    return evaluation


def build_testbed_once(root: str | Path, seed: int) -> dict[str, Path]:
    """The testbed under `root`, built on first use (its marker file records that the build finished)."""
    root = Path(root).expanduser()
    marker = root / "testbed.json"
    if marker.exists():
        return {k: root / v for k, v in json.loads(marker.read_text()).items()}
    from trainer.testbed import TestbedConfig, build_testbed

    paths = build_testbed(root, TestbedConfig(seed=seed))
    marker.write_text(json.dumps({k: str(Path(v).relative_to(root)) for k, v in paths.items()}))
    return {k: Path(v) for k, v in paths.items()}


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for name, (scores, labels) in curves.items():
        fpr, tpr = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="held-out feedback (unseen prompts)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_evaluation(evaluation: dict[str, Any]) -> str:
    lines = [
        f"held-out feedback: {evaluation['val_samples']} samples, {evaluation['val_prompts']} prompts unseen in "
        f"training; {evaluation['epochs_run']} epochs, {evaluation['seconds']}s",
        f"{'method':<16} {'accuracy':>9} {'AUC':>7}",
    ]
    for name in ("learned reward", "CLIP score"):
        m = evaluation[name]
        lines.append(f"{name:<16} {m['accuracy']:>9.3f} {m['auc']:>7.3f}")
    lines.append(f"learned reward - CLIP score: {evaluation['accuracy_gain_points']:+.1f} accuracy points")
    return "\n".join(lines)


# The local profile's alignment reward: trained on the testbed on first use (seeded), like the tiny models.
TESTBED_REWARD_SPEC = "~/.cache/rewardfleet/alignment_testbed"
# Bump when the testbed or the training changes, so a cached reward is rebuilt.
TESTBED_REWARD_VERSION = 1


def ensure_testbed_reward(root: str | Path = TESTBED_REWARD_SPEC) -> Path:
    """The alignment reward trained on the synthetic testbed under `root`/reward, trained if missing or stale."""
    root = Path(root).expanduser()
    reward_dir = root / "reward"
    marker = root / "version.json"
    stamp = {"version": TESTBED_REWARD_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == stamp and (reward_dir / "alignment_reward.json").exists():
        return reward_dir
    if root.exists():
        shutil.rmtree(root)
    train_reward(RewardTrainingConfig(out_dir=str(reward_dir), testbed=str(root / "testbed")), progress=False)
    marker.write_text(json.dumps(stamp))
    return reward_dir
