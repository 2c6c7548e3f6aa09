"""The learned alignment reward's loss, metrics, data split and feedback loader."""

import json

import numpy as np
import pytest
import torch

from services.codec import encode_image
from services.rewards.alignment import HeadConfig, build_head, head_logits
from trainer.feedback import FeedbackError, load_feedback
from trainer.reward_training import alignment_loss, best_threshold, roc_auc, split_by_prompt


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
    from services.tiny_models import tiny_clip

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
