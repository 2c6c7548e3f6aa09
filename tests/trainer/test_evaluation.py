"""The testbed world's held-out metrics (trainer/evaluation.py): the oracle's accuracy on renders of known and of
perturbed attributes, and the fidelity distance under a tiny random CLIP."""

import numpy as np
import pytest
from PIL import Image

from trainer.evaluation import ORACLE_ATTRIBUTES, Fidelity, mean_se, oracle_metrics, parse_testbed_prompts
from trainer.local_models.oracle import attribute_accuracy
from trainer.local_models.scenes import ATTRIBUTES, perturb, render_image, render_prompt, split_prompts
from trainer.metrics import plot_reward_curve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 64 px: the oracle reads clean renders of every attribute right there (its docstring's table).
SIZE = 64


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    """Eight of the testbed's held-out attribute dicts."""
    return split_prompts()["heldout"][:8]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIP saved as a model directory, as `testbed.fidelity_clip` names one."""
    from trainer.local_models.tiny import save_pretrained, tiny_clip

    path = tmp_path_factory.mktemp("fidelity") / "clip"
    save_pretrained(path, *tiny_clip(seed=0))
    return str(path)


def renders(attrs_list: list[dict], per_prompt: int, seed: int, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_image(attrs, rng, size) for attrs in attrs_list for _ in range(per_prompt)]


def test_oracle_metrics_of_renders_of_their_prompts_are_all_right(heldout):
    images = renders(heldout, 2, seed=1)
    prompts = [render_prompt(a) for a in heldout for _ in range(2)]
    metrics = oracle_metrics(images, prompts)
    assert set(metrics) == {f"eval/oracle/{attr}/{stat}" for attr in ORACLE_ATTRIBUTES for stat in ("mean", "se")}
    assert metrics["eval/oracle/all/mean"] >= 15 / 16
    # The per-image means are the oracle's own accuracy.
    expected = attribute_accuracy(images, [a for a in heldout for _ in range(2)])
    for attr in ORACLE_ATTRIBUTES:
        assert metrics[f"eval/oracle/{attr}/mean"] == pytest.approx(expected[attr])
        assert 0.0 <= metrics[f"eval/oracle/{attr}/se"] <= 0.5 / np.sqrt(15)


def test_oracle_metrics_of_renders_of_other_attributes_are_lower(heldout):
    """Images of single-attribute perturbations of each prompt, scored against the prompt: the changed attribute
    reads wrong, so each attribute's accuracy is the share of images that kept it, and none gets all four."""
    rng = np.random.default_rng(2)
    asked = [a for a in heldout for _ in range(2)]  # (16,) the prompts' attributes
    shown = [p for attrs in heldout for p in perturb(attrs, rng, 2)]  # (16,) each differs in one attribute
    prompts = [render_prompt(a) for a in asked]
    own = oracle_metrics(renders(heldout, 2, seed=1), prompts)
    metrics = oracle_metrics(renders(shown, 1, seed=3), prompts)
    assert metrics["eval/oracle/all/mean"] <= 1 / 16 < own["eval/oracle/all/mean"]
    for attr in ATTRIBUTES:
        kept = np.array([s[attr] == a[attr] for s, a in zip(shown, asked, strict=True)])  # (16,) bool
        # What a perfect reader would score, give or take one image the oracle misreads.
        assert metrics[f"eval/oracle/{attr}/mean"] == pytest.approx(kept.mean(), abs=1 / 16)
        if not kept.all():  # object is never perturbed
            assert metrics[f"eval/oracle/{attr}/mean"] < own[f"eval/oracle/{attr}/mean"]


def test_mean_se_is_the_standard_error_over_images():
    stats = mean_se(np.array([1, 1, 0, 1]))
    assert stats["mean"] == 0.75 and stats["se"] == pytest.approx(np.std([1, 1, 0, 1], ddof=1) / 2)
    assert np.isnan(mean_se(np.array([1.0]))["se"])


def test_oracle_metrics_reject_prompts_of_another_world():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"1 of 2 held-out prompts do not parse .* number 2: "):
        oracle_metrics([image, image], ["one red ball in the city", "two green dogs in the city"])
    with pytest.raises(ValueError, match="one prompt per image"):
        oracle_metrics([image], [])


def test_parse_testbed_prompts_names_the_first_bad_prompt():
    prompts = ["one red ball in the city", "two green dogs in the city", "a photo of a cat"]
    with pytest.raises(ValueError) as error:
        parse_testbed_prompts(prompts)
    assert str(error.value).startswith(
        "2 of 3 held-out prompts do not parse as testbed prompts; the first, number 2: 'two green dogs in the city' "
        "is not a testbed prompt: object 'dogs'"
    )
    assert parse_testbed_prompts(prompts[:1]) == [{"count": 1, "color": "red", "object": "ball", "background": "city"}]


def test_fidelity_is_closer_for_renders_of_the_prompt(clip_dir, heldout):
    """Fresh renders of each prompt (other seeds than its references') are nearer its reference than renders of the
    next prompt, flat color images or pixel noise: under a random CLIP too, images alike embed alike."""
    attrs = heldout[:4]
    prompts = [render_prompt(a) for a in attrs]
    fidelity = Fidelity(clip_dir, prompts, resolution=32, renders=16, seed=0)
    per_image = [p for p in prompts for _ in range(4)]
    rng = np.random.default_rng(5)
    images = {
        "own": renders(attrs, 4, seed=4, size=32),
        "other": renders(attrs[1:] + attrs[:1], 4, seed=4, size=32),
        "flat": [np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8) for _ in per_image],
        "noise": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in per_image],
    }
    distances = {name: fidelity.distances(shown, per_image) for name, shown in images.items()}  # name -> (16,)
    assert all(((d >= -1e-6) & (d <= 2.0)).all() for d in distances.values())
    for name in ("other", "flat", "noise"):
        assert distances["own"].mean() < distances[name].mean(), name
    metrics = fidelity(images["own"], per_image)
    expected = mean_se(distances["own"])
    assert metrics == pytest.approx({"eval/fidelity/mean": expected["mean"], "eval/fidelity/se": expected["se"]})


def test_fidelity_references_are_drawn_once_from_the_seed(clip_dir, heldout):
    prompts = [render_prompt(a) for a in heldout[:2]]
    a, b = (Fidelity(clip_dir, prompts, resolution=32, renders=4, seed=0) for _ in range(2))
    other_seed = Fidelity(clip_dir, prompts, resolution=32, renders=4, seed=1)
    for prompt in prompts:
        assert np.array_equal(a.references[prompt], b.references[prompt])
        assert not np.array_equal(a.references[prompt], other_seed.references[prompt])
        assert np.linalg.norm(a.references[prompt]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no fidelity reference"):
        a.distances(renders(heldout[2:3], 1, seed=0, size=32), [render_prompt(heldout[2])])
    with pytest.raises(ValueError, match="'two green dogs in the city' is not a testbed prompt"):
        Fidelity(clip_dir, ["two green dogs in the city"], resolution=32, renders=1)


def test_the_reward_curve_adds_a_fidelity_panel(tmp_path):
    rows = [{"round": r, "eval/opt/mean": float(r), "eval/opt/se": 0.1} for r in range(3)]

    def width(name, rows):
        path = tmp_path / f"{name}.png"
        plot_reward_curve(rows, ["opt"], path)
        return Image.open(path).size[0]

    one = width("plain", rows)
    testbed = [
        {**r, "eval/oracle/all/mean": 0.3, "eval/oracle/all/se": 0.1, "eval/fidelity/mean": 0.2, "eval/fidelity/se": 0}
        for r in rows
    ]
    assert width("testbed", testbed) == 3 * one  # opt, the oracle panel, the fidelity panel


def test_the_worker_scores_every_held_out_image_against_its_own_prompt(tmp_path, heldout):
    """Worker._testbed_metrics on rank 0 of a single process: the gathered (prompts, seeds) images, flattened in the
    order their prompts are repeated (a seed-major order would pair images with other prompts' attributes)."""
    from types import SimpleNamespace

    from trainer.config import load_finetune_config
    from trainer.worker import Worker

    prompts = [render_prompt(a) for a in heldout[:3]]
    (tmp_path / "eval.txt").write_text("\n".join(prompts))
    config = load_finetune_config(None, ["testbed.oracle=true", f"prompts.eval_file={tmp_path / 'eval.txt'}"])
    held_out = np.stack(renders(heldout[:3], 2, seed=6)).reshape(3, 2, SIZE, SIZE, 3)
    worker = SimpleNamespace(config=config, is_main=True, eval_prompts=prompts, fidelity=None)
    metrics = Worker._testbed_metrics(worker, held_out)
    assert metrics == oracle_metrics(list(held_out.reshape(-1, SIZE, SIZE, 3)), [p for p in prompts for _ in range(2)])
    assert metrics["eval/oracle/all/mean"] >= 5 / 6
    off = load_finetune_config(
        None, [f"prompts.eval_file={tmp_path / 'eval.txt'}", "testbed.oracle=false", "testbed.fidelity_clip=null"]
    )
    assert Worker._testbed_metrics(SimpleNamespace(config=off), None) == {}


def test_improvement_summary_reports_the_oracle_accuracy_when_rows_have_it():
    from trainer.metrics import improvement_summary

    rows = [{"round": r, "eval/opt/mean": r, "eval/opt/se": 0.5, "eval/opt/win_rate": 0.5} for r in range(3)]
    assert "final_oracle_all" not in improvement_summary(rows, "opt")
    rows = [{**row, "eval/oracle/all/mean": 0.25 * row["round"]} for row in rows]
    summary = improvement_summary(rows, "opt")
    assert summary["base_oracle_all"] == 0.0 and summary["final_oracle_all"] == 0.5 and summary["gain_in_se"] == 4.0
