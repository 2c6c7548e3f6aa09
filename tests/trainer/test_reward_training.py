"""The learned alignment reward's loss, metrics, data split and feedback loader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.codec import encode_image
from services.rewards.alignment import HeadConfig, build_head, head_logits, set_cosine_affine
from tests.conftest import tiny_training_config
from trainer.feedback import FeedbackError, load_feedback
from trainer.reward_eval import best_threshold, roc_auc
from trainer.reward_training import alignment_loss, fit_cosine_affine, split_by_prompt


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    image = _unit(torch.randn(6, 8, generator=g))
    text = _unit(torch.randn(6, 8, generator=g))
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    aug = _unit(torch.randn(2, 4, 8, generator=g))  # rows 0 and 1 get the augmentation, N = 4
    torch.manual_seed(0)
    head = build_head(HeadConfig(embed_dim=8, hidden_sizes=(16,), dropout=0.0))
    return head, image, text, labels, aug


def test_lambda_zero_is_plain_mse(batch):
    head, image, text, labels, aug = batch
    loss, parts = alignment_loss(head, image, text, labels, aug, lambda_cls=0.0, temperature=0.1)
    expected = torch.mean((torch.sigmoid(head_logits(head, image, text)) - labels.float()) ** 2)
    torch.testing.assert_close(loss, expected)
    assert parts["cls"] == 0.0
    torch.testing.assert_close(alignment_loss(head, image, text, labels)[0], expected)


def test_classification_term_is_cross_entropy_over_the_true_prompt(batch):
    head, image, text, labels, aug = batch
    loss, parts = alignment_loss(head, image, text, labels, aug, lambda_cls=2.0, temperature=0.5)
    # By hand: r(x_i, z_ij) for the 2 augmented rows and N = 4 prompts, softmax over j of r / T, target j = 0.
    r = torch.stack(
        [torch.stack([torch.sigmoid(head_logits(head, image[i], aug[i, j])) for j in range(4)]) for i in range(2)]
    )
    ce = -torch.log_softmax(r / 0.5, dim=-1)[:, 0].mean()
    mse = torch.mean((torch.sigmoid(head_logits(head, image, text)) - labels.float()) ** 2)
    torch.testing.assert_close(loss, mse + 2.0 * ce)
    assert parts["cls"] == pytest.approx(float(ce), abs=1e-6)


def test_gradient_flows_to_the_head_only(batch):
    from trainer.local_models.tiny import tiny_clip

    head, _, _, labels, _ = batch
    clip, processor = tiny_clip(seed=0)
    clip.requires_grad_(False)  # frozen, as in train_reward
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 60, 120, 180, 240, 30)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor(text=[f"prompt {i}" for i in range(6)], return_tensors="pt", padding=True)
    image = _unit(clip.get_image_features(pixel_values=pixels).pooler_output)
    text = _unit(clip.get_text_features(**tokens).pooler_output)
    head = build_head(HeadConfig(embed_dim=image.shape[1], hidden_sizes=(16,), dropout=0.0))
    aug = text[:2, None, :].expand(2, 3, -1)
    loss, _ = alignment_loss(head, image, text, labels, aug, lambda_cls=1.0, temperature=0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_residual_head_starts_as_the_cosine_classifier(batch):
    _, image, text, labels, aug = batch
    head = build_head(HeadConfig(embed_dim=8, hidden_sizes=(16,), dropout=0.0, residual=True))
    set_cosine_affine(head, 12.0, -3.0)
    cosine = (image * text).sum(-1)
    torch.testing.assert_close(head_logits(head, image, text), 12.0 * cosine - 3.0)
    torch.testing.assert_close(
        head_logits(head, image[:2, None, :], aug), 12.0 * (image[:2, None, :] * aug).sum(-1) - 3.0
    )
    # Every parameter learns: the zero last layer first, the layers below it once it is no longer zero.
    before = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(2):
        loss, _ = alignment_loss(head, image, text, labels, aug, lambda_cls=1.0, temperature=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, head.parameters(), strict=True))


def test_fit_cosine_affine_recovers_a_logistic_model():
    g = torch.Generator().manual_seed(0)
    cosine = 0.2 + 0.1 * torch.randn(20000, generator=g)
    labels = torch.bernoulli(torch.sigmoid(30.0 * cosine - 6.0), generator=g)
    scale, bias = fit_cosine_affine(cosine, labels)
    assert scale == pytest.approx(30.0, rel=0.15) and bias == pytest.approx(-6.0, rel=0.15)


def test_auc_and_threshold_by_hand():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert roc_auc(np.array([0.1, 0.6, 0.5, 0.9]), labels) == 0.75
    t = best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), labels)
    assert 0.2 < t < 0.8


def test_split_by_prompt_holds_out_whole_prompts(tmp_path):
    feedback = _write_feedback(tmp_path, [{"prompt": f"prompt {i % 10}", "label": i % 2} for i in range(40)])
    train, val = split_by_prompt(load_feedback(feedback), 0.2, seed=0)
    assert {s.prompt for s in train}.isdisjoint({s.prompt for s in val})
    assert len({s.prompt for s in val}) == 2 and len(train) + len(val) == 40


def _write_feedback(tmp_path, rows, image_ok=True):
    (tmp_path / "images").mkdir(exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        name = f"images/{i}.png"
        (tmp_path / name).write_bytes(encode_image(np.full((8, 8, 3), i, np.uint8), "PNG"))
        lines.append(json.dumps({"image": name, **row}))
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_feedback_errors_name_their_lines(tmp_path):
    path = _write_feedback(tmp_path, [{"prompt": "a", "label": 1}, {"prompt": "b", "label": 0}])
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG broken")
    path.write_text(
        path.read_text()
        + "\n".join(
            [
                json.dumps({"image": "images/missing.png", "prompt": "c", "label": 1}),
                json.dumps({"image": "images/0.png", "prompt": "d", "label": 2}),
                json.dumps({"image": "images/corrupt.png", "prompt": "e", "label": 0}),
                "{not json",
                json.dumps({"image": "images/0.png", "label": 1}),
            ]
        )
        + "\n"
    )
    with pytest.raises(FeedbackError) as e:
        load_feedback(path)
    message = str(e.value)
    assert "5 problem(s)" in message
    assert ":3: image 'images/missing.png' not found" in message
    assert ":4: label must be 0, 1, true or false, got 2" in message
    assert ":5: unreadable image 'images/corrupt.png'" in message
    assert ":6: " in message and ":7: missing field(s) ['prompt']" in message


def test_feedback_attributes_are_kept_when_complete(tmp_path):
    attrs = {"count": 2, "color": "green", "object": "ball", "background": "city"}
    path = _write_feedback(
        tmp_path,
        [{"prompt": "two green balls in the city", "label": True, **attrs}, {"prompt": "x", "label": 0, "count": 1}],
    )
    good, partial = load_feedback(path)
    assert good.attrs == attrs and good.label == 1 and partial.attrs is None


# --- train_reward end to end, on a tiny testbed -------------------------------------------------------------------


def test_train_reward_splits_three_ways_and_writes_a_servable_reward(tiny_testbed, tmp_path):
    from services.registry import build_reward
    from trainer.reward_training import train_reward

    evaluation = train_reward(tiny_training_config(tiny_testbed, tmp_path / "reward"), progress=False)
    # The testbed's 448 prompts: 112 pretrain the CLIP, 112 are held out, 224 train; a fifth of those validate.
    assert evaluation["heldout_prompts"] == 112 and evaluation["train_prompts"] == 224
    assert evaluation["val_prompts"] == round(0.2 * 224)
    assert 1 <= evaluation["best_epochs"] <= evaluation["epochs_run"] <= 4
    history = [json.loads(line) for line in (tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == evaluation["epochs_run"] and {"val_mse", "val_auc"} <= history[0].keys()
    refit = (tmp_path / "reward" / "metrics_refit.jsonl").read_text().splitlines()
    assert len(refit) == evaluation["best_epochs"]
    for name in ("learned reward", "CLIP score"):
        assert 0.0 <= evaluation[name]["accuracy"] <= 1.0
    assert (tmp_path / "reward" / "roc.png").stat().st_size > 0
    saved = json.loads((tmp_path / "reward" / "alignment_reward.json").read_text())
    assert saved["clip"] == "clip" and saved["evaluation"]["best_epochs"] == evaluation["best_epochs"]
    reward = build_reward("alignment", {"model_dir": str(tmp_path / "reward")})
    reward.load("cpu")
    row = json.loads(Path(tiny_testbed["heldout"]).read_text().splitlines()[0])
    image = np.asarray(Image.open(Path(tiny_testbed["heldout"]).parent / row["image"]).convert("RGB"))
    (out,) = reward.score([image], [row["prompt"]])
    assert 0.0 < out.reward < 1.0 and -1.0 <= out.components["clip_score"] <= 1.0


def test_held_out_feedback_never_steers_training(tiny_testbed, tmp_path):
    from safetensors.torch import load_file

    from trainer.reward_training import train_reward

    # The same held-out images with every label flipped, next to the original (image paths are relative).
    heldout = Path(tiny_testbed["heldout"])
    flipped = heldout.with_name("flipped.jsonl")
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    flipped.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))

    a = train_reward(tiny_training_config(tiny_testbed, tmp_path / "a"), progress=False)
    b = train_reward(tiny_training_config(tiny_testbed, tmp_path / "b", heldout_feedback=str(flipped)), progress=False)
    assert a["best_epochs"] == b["best_epochs"]
    head_a, head_b = load_file(tmp_path / "a" / "head.safetensors"), load_file(tmp_path / "b" / "head.safetensors")
    assert head_a.keys() == head_b.keys() and all(head_a[k].equal(head_b[k]) for k in head_a)
    # ...while the evaluation does read it: flipped labels, complementary accuracy at the same threshold.
    assert b["learned reward"]["accuracy"] == pytest.approx(1 - a["learned reward"]["accuracy"])


def test_training_config_rejects_bad_fractions_and_metrics():
    from trainer.reward_training import RewardTrainingConfig

    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        RewardTrainingConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="early_stopping must be 'mse' or 'auc', got 'loss'"):
        RewardTrainingConfig(early_stopping="loss")
