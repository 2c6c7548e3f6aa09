"""Training and evaluation of the learned alignment reward (Lee et al. 2023).

    rewardfleet train-reward                                   # synthetic testbed (built on first use), CPU
    rewardfleet train-reward --config my.yaml --set lambda_cls=0

Loss, over a batch of feedback (image x, prompt z, label y in {0, 1}), with r = sigmoid(head(CLIP(x), CLIP(z))):
    MSE(r(x, z), y) + lambda_cls * CE(softmax_j(r(x, z_j) / T), j = 0)
The second term is the paper's prompt-classification augmentation. For each positive sample whose prompt has
attributes, z_0 is the true prompt and z_1..z_{N-1} are prompts that change one attribute (count, color or
background). CLIP is frozen: its embeddings are computed once, and only the head trains.

Prompts are split three ways: training prompts fit the head, validation prompts (a fraction of the training ones)
pick the epoch count by early stopping, after which the head is refit on all training prompts for that many epochs,
and held-out prompts serve only the final evaluation. It reports accuracy and AUC of the learned reward against the
CLIP-score baseline (cosine of the same CLIP's embeddings). CLIP score's decision threshold is the best one on the
training feedback; the learned reward, a predicted probability, decides at 0.5. The ROC curves are written to a PNG.

The config is trainer/reward_config.py (RewardTrainingConfig); the evaluation is trainer/reward_eval.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.clip import clip_embeddings, load_clip
from services.config import to_dict
from services.models import resolve_model_source
from services.rewards.alignment import (
    HeadConfig,
    build_head,
    head_logits,
    save_alignment_model,
    set_cosine_affine,
)
from trainer.feedback import FeedbackSample, load_feedback, load_images
from trainer.reward_config import RewardTrainingConfig

# The config and the evaluation have modules of their own; these names are re-exported for the CLI.
from trainer.reward_eval import evaluate, format_evaluation, plot_roc, roc_auc

__all__ = ["RewardTrainingConfig", "alignment_loss", "fit_cosine_affine", "format_evaluation", "train_reward"]


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


# --- training ----------------------------------------------------------------------------------------------------


def fit_cosine_affine(cosine, labels, steps: int = 100) -> tuple[float, float]:
    """(scale, bias) minimising MSE(sigmoid(scale * cosine + bias), labels): the CLIP-score classifier, fitted.

    cosine, labels: (N,) tensors. A residual head starts from it, so training begins at the baseline's accuracy.
    """
    import torch

    # Fitted on the standardised cosine (CLIP cosines span a narrow range), then mapped back.
    mean, std = cosine.mean(), cosine.std().clamp_min(1e-6)
    z = (cosine - mean) / std
    params = torch.tensor([1.0, 0.0], requires_grad=True)  # (scale, bias) on z
    optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.mean((torch.sigmoid(params[0] * z + params[1]) - labels.float()) ** 2)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = params.detach()
    return float(scale / std), float(bias - scale * mean / std)


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


def _labels(samples: list[FeedbackSample]):
    import torch

    return torch.tensor([s.label for s in samples], dtype=torch.float32)  # (N,)


def _fit(config: RewardTrainingConfig, samples, data, val_data, epochs: int, texts: _TextCache, progress: bool):
    """Trains a fresh head on (samples, data = (image, text, label)) for up to `epochs` epochs.

    With val_data, stops after `patience` epochs without a better validation MSE and returns the best epoch's
    weights; without, runs all `epochs`. Returns (head, head_config, history: one dict per epoch).
    """
    import torch
    from tqdm import tqdm

    from trainer.local_models.scenes import perturb, render_prompt

    image, text, labels = data
    torch.manual_seed(config.seed)
    head_config = HeadConfig(
        embed_dim=image.shape[1], hidden_sizes=config.hidden_sizes, dropout=config.dropout, residual=config.residual
    )
    head = build_head(head_config)
    if config.residual:
        set_cosine_affine(head, *fit_cosine_affine((image * text).sum(-1), labels))
    head = head.to(config.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    augmentable = np.array([s.label == 1 and s.attrs is not None for s in samples])

    def validate() -> dict[str, float]:
        head.eval()
        with torch.no_grad():
            r = torch.sigmoid(head_logits(head, val_data[0], val_data[1]))  # (V,)
        mse = float(torch.mean((r - val_data[2]) ** 2))
        return {"val_mse": mse, "val_auc": roc_auc(r.numpy(), val_data[2].numpy())}

    best, best_state, bad_epochs, history = float("inf"), None, 0, []
    desc = "train-reward" if val_data is not None else "train-reward (refit)"
    bar = tqdm(range(epochs), desc=desc, disable=not progress)
    for epoch in bar:
        # 1. One pass over the feedback in shuffled batches.
        head.train()
        order = rng.permutation(len(samples))
        sums = {"loss": 0.0, "mse": 0.0, "cls": 0.0}
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            # 2. Augmented rows first, as alignment_loss expects: the true prompt and N - 1 one-attribute changes.
            idx = np.concatenate([idx[augmentable[idx]], idx[~augmentable[idx]]])
            aug = None
            n_aug = int(augmentable[idx].sum())
            if config.lambda_cls > 0 and n_aug:
                prompts = []
                for i in idx[:n_aug]:
                    prompts += [samples[i].prompt] + [
                        render_prompt(a) for a in perturb(samples[i].attrs, rng, config.num_prompts - 1)
                    ]
                aug = texts(prompts).view(n_aug, config.num_prompts, -1)  # (P, N, D)
            # 3. The step.
            loss, parts = alignment_loss(
                head, image[idx], text[idx], labels[idx], aug, config.lambda_cls, config.temperature
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for k, v in (("loss", loss.item()), *parts.items()):
                sums[k] += v * len(idx)
        record = {"epoch": epoch, **{k: v / len(samples) for k, v in sums.items()}}
        # 4. Early stopping on the validation MSE.
        if val_data is not None:
            record.update(validate())
            # Lower is better: MSE as is, AUC negated.
            value = record["val_mse"] if config.early_stopping == "mse" else -record["val_auc"]
            if value < best - 1e-6:
                best, bad_epochs = value, 0
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            else:
                bad_epochs += 1
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "val_mse")})
        if val_data is not None and bad_epochs >= config.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, head_config, history


def _train_reward(config: RewardTrainingConfig, progress: bool) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data, split by prompt three ways: train (fits the head), val (early stopping), held-out (evaluation only).
    if config.testbed is not None:
        from trainer.local_models.testbed_reward import build_testbed_once

        paths = build_testbed_once(config.testbed, config.seed, progress)
        clip_source, train_path, heldout_path = str(paths["clip"]), paths["train"], paths["heldout"]
    else:
        clip_source, train_path, heldout_path = config.clip, config.feedback, config.heldout_feedback
    train_all = load_feedback(train_path)
    if heldout_path is not None:
        heldout = load_feedback(heldout_path)
    else:
        train_all, heldout = split_by_prompt(train_all, config.heldout_fraction, config.seed)
    overlap = {s.prompt for s in train_all} & {s.prompt for s in heldout}
    if overlap:
        raise ValueError(f"held-out prompts also appear in training feedback: {sorted(overlap)[:5]}")
    if len({s.prompt for s in train_all}) < 2:
        raise ValueError("training feedback needs at least 2 distinct prompts (one is held out for early stopping)")
    train, val = split_by_prompt(train_all, config.val_fraction, config.seed)

    # 2. The frozen CLIP's embeddings, computed once.
    source = resolve_model_source(clip_source, "train-reward")
    clip, processor = load_clip(source, "train-reward", "frozen CLIP")
    clip = clip.to(config.device).eval().requires_grad_(False)
    texts = _TextCache(clip, processor, config.device)
    data = {
        name: (*_embed_samples(samples, clip, processor, texts, config.device), _labels(samples))
        for name, samples in (("train", train), ("val", val), ("heldout", heldout))
    }  # name -> (image (N, D), text (N, D), label (N,))

    # 3. Fit on train with early stopping on val; then, with refit, again on train + val for the epochs it chose.
    head, head_config, history = _fit(config, train, data["train"], data["val"], config.epochs, texts, progress)
    key = {"mse": lambda r: r["val_mse"], "auc": lambda r: -r["val_auc"]}[config.early_stopping]
    best_epochs = 1 + int(np.argmin([key(r) for r in history]))
    fit_samples, fit_data, refit_history = train, data["train"], []
    if config.refit:
        fit_samples = train + val
        fit_data = tuple(torch.cat(parts) for parts in zip(data["train"], data["val"], strict=True))
        head, head_config, refit_history = _fit(config, fit_samples, fit_data, None, best_epochs, texts, progress)

    # 4. Evaluation on unseen prompts: learned reward vs CLIP score.
    metrics, scores = evaluate(head, fit_data, data["heldout"])
    evaluation: dict[str, Any] = {
        "train_samples": len(fit_samples),
        "train_prompts": len({s.prompt for s in fit_samples}),
        "val_prompts": len({s.prompt for s in val}),
        "heldout_samples": len(heldout),
        "heldout_prompts": len({s.prompt for s in heldout}),
        "best_epochs": best_epochs,
        "epochs_run": len(history),
        "refit": config.refit,
        "seconds": round(time.perf_counter() - started, 1),
        "config": to_dict(config),
    }
    evaluation.update(metrics)

    # 5. Outputs: the reward directory (self-contained: a local CLIP is copied in), metrics, ROC plot.
    if Path(source).is_dir():
        shutil.copytree(source, out / "clip", dirs_exist_ok=True)
        clip_ref = "clip"
    else:
        clip_ref = clip_source
    save_alignment_model(out, clip_ref, head, head_config, evaluation=evaluation)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if refit_history:
        (out / "metrics_refit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refit_history))
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
    labels = data["heldout"][2].numpy()
    plot_roc({name: (held, labels) for name, held in scores.items()}, out / "roc.png")
    return evaluation
