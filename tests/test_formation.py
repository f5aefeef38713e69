"""How a circuit formed, told truthfully: the rules on hand-made numbers (no trained run).

Each rule is checked against values computed by hand here: the effect to explain (gap, its
standard error, z, share), the bootstrap of a circuit, emergence by material share, and roles.
"""

from __future__ import annotations

import numpy as np
import pytest

from circuits.config import SweepConfig
from circuits.discovery.uncertainty import resample_circuits
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec
from circuits.tracking import Tracking, explanandum, material_emergence, track

STEPS = np.array([0, 10, 20, 30, 40])


def test_gap_its_standard_error_z_and_share_are_computed_per_step():
    clean = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 4.0, 6.0, 8.0]])
    e = explanandum(clean, np.zeros_like(clean))
    se_hand = np.std([2, 4, 6, 8], ddof=1) / 2  # sqrt(20/3) / sqrt(4)
    assert e.gap.tolist() == [1.0, 5.0]
    assert e.gap_se[0] == 0.0 and e.gap_se[1] == pytest.approx(se_hand)
    assert e.z[0] == np.inf and e.z[1] == pytest.approx(5.0 / se_hand)
    assert e.share.tolist() == [0.2, 1.0]


def test_a_step_has_a_circuit_only_with_a_significant_gap_and_a_reproducible_circuit():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, size=(3, 64))
    clean = noise + np.array([[0.0], [5.0], [5.0]])  # step 0: no effect; steps 1, 2: z ~ 40
    e = explanandum(clean, np.zeros_like(clean), reproducibility=np.array([1.0, 0.3, 0.9]))
    assert e.has_circuit.tolist() == [False, False, True]  # step 1: an effect, but its circuit does not come back
    assert explanandum(clean, np.zeros_like(clean)).has_circuit.tolist() == [False, True, True]


def test_a_floor_on_the_share_of_the_largest_gap_is_a_setting():
    clean = np.array([[1.0, 1.2, 0.8, 1.0], [100.0, 101.0, 99.0, 100.0]])
    assert explanandum(clean, np.zeros_like(clean)).has_circuit.tolist() == [True, True]
    assert explanandum(clean, np.zeros_like(clean), gap_floor=0.05).has_circuit.tolist() == [False, True]


@pytest.mark.parametrize("setting, value, message", [
    ("gap_z", -1.0, "--gap-z -1.0"), ("reproducible", 1.5, "--reproducible 1.5"), ("gap_floor", 2.0, "--gap-floor 2.0"),
])
def test_thresholds_outside_their_range_are_refused(setting, value, message):
    with pytest.raises(CircuitsError, match=message):
        explanandum(np.ones((1, 2)), np.zeros((1, 2)), **{setting: value})


@pytest.mark.parametrize("settings, message", [
    ({"resamples": 0}, "--resamples 0: expected a whole number of resamples >= 1"),
    ({"stable_share": 0.0}, r"--stable-share 0.0: expected a share of resamples in \(0, 1\]"),
    ({"stable_share": 1.5}, r"--stable-share 1.5"),
])
def test_a_resample_count_below_one_or_a_stable_share_outside_0_1_is_refused(settings, message):
    with pytest.raises(CircuitsError, match=message):
        SweepConfig(**settings)


def _top2(scores: np.ndarray) -> np.ndarray:
    mask = np.zeros(scores.shape, dtype=bool)
    mask.flat[np.argsort(-np.abs(scores), axis=None)[:2]] = True
    return mask


def test_the_bootstrap_keeps_edges_every_example_needs_and_drops_those_one_example_carries():
    n = 40
    per_example = np.zeros((n, 1, 4))
    per_example[:, 0, 0] = -2.0  # every example: a strong edge
    per_example[:, 0, 1] = -1.0  # every example: the second edge
    per_example[0, 0, 2] = -50.0  # one outlier example makes edge 2 rank second in the full data
    circuit = _top2(per_example.mean(0))
    assert circuit[0].tolist() == [True, False, True, False]
    u = resample_circuits(per_example, circuit, _top2, resamples=200, seed=1)
    left_out = (1 - 1 / n) ** n  # chance that a resample misses example 0 (~0.36)
    assert u.inclusion[0, 0] == 1.0
    assert u.inclusion[0, 2] == pytest.approx(1 - left_out, abs=0.08)
    assert u.stable[0].tolist() == [True, False, False, False]  # edge 2 is in < 80% of resamples
    assert u.score_se[0, 0] == pytest.approx(0.0)  # every example agrees: no spread
    assert u.score_se[0, 2] == pytest.approx(50 / n * np.sqrt(1 - 1 / n), rel=0.2)  # bootstrap se of a mean
    assert 0.5 < u.reproducibility < 1.0


def test_identical_examples_give_a_fully_reproducible_circuit():
    per_example = np.tile(np.array([[[-3.0, -1.0, 0.0]]]), (8, 1, 1))
    circuit = _top2(per_example.mean(0))
    u = resample_circuits(per_example, circuit, _top2, resamples=5)
    assert u.resample_jaccard.tolist() == [1.0] * 5 and u.stable.tolist() == circuit.tolist()


def test_an_edge_emerges_when_its_share_stays_material_even_if_one_selection_wavers():
    # shares of the gap at 5 steps for 3 edges; the final shares are -0.5, -0.4, -0.3
    shares = np.array([
        [0.00, 0.00, -0.20],
        [-0.30, -0.01, -0.25],
        [-0.40, -0.30, -0.01],  # edge 2 falls below 10% of its final share here
        [-0.45, -0.35, -0.30],
        [-0.50, -0.40, -0.30],
    ])
    masks = np.array([
        [False, False, True],
        [True, False, True],
        [False, True, False],  # edge 0 drops out of one step's selection
        [True, True, True],
        [True, True, True],
    ])
    assert material_emergence(shares, masks, STEPS).tolist() == [10, 20, 30]


def test_an_edge_outside_the_final_circuit_never_emerges():
    shares = np.full((5, 1), -0.5)
    masks = np.array([[True], [True], [True], [True], [False]])
    assert material_emergence(shares, masks, STEPS).tolist() == [-1]


def _tracking(heads: dict[str, np.ndarray]) -> Tracking:
    return Tracking(run="x", steps=STEPS, curves={}, heads=heads, circuit=None, phases=[], stability={})


def test_a_flat_detector_gets_no_role_and_a_rising_head_forms_at_the_halfway_step():
    flat = np.full((5, 1, 2), 0.0159)
    rising = np.zeros((5, 1, 2))
    rising[:, 0, 1] = [0.05, 0.10, 0.30, 0.60, 0.85]  # halfway from 0.05 to 0.85 is 0.45: passed at step 30
    rising[:, 0, 0] = [0.05, 0.06, 0.07, 0.08, 0.10]  # rises 0.05: below the floor
    roles = _tracking({"copy_suppression": flat, "induction": rising}).roles()
    assert [(r.kind, r.head, r.formed, r.after_step) for r in roles] == [("induction", "a0.h1", 30, 20)]


class _StudyWithOutputs:
    """The least a study offers ``track``: steps, per-example outputs, and no circuit."""

    steps = [0, 10, 20, 30, 40, 50]
    manifest = None

    def __init__(self, clean: np.ndarray) -> None:
        self.clean = clean

    def metric(self, per_example: bool = False):
        return self.clean if per_example else self.clean.mean(1)

    def metric_corrupted(self, per_example: bool = False):
        return np.zeros_like(self.clean) if per_example else np.zeros(len(self.clean))

    def loss(self, per_example: bool = False):
        return np.ones(len(self.clean))

    def has(self, key: str) -> bool:
        return key.startswith("outputs/metric")

    def keys(self, prefix: str | None = None) -> list[str]:
        return []


def test_without_a_circuit_search_the_summary_speaks_of_an_effect_with_its_gap_and_uncertainty():
    from circuits.tracking import summary_text

    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, size=(6, 32)) + np.array([[0], [0], [0.01], [2], [4], [8]])
    text = summary_text(track(_StudyWithOutputs(clean)))
    assert "no effect yet at steps 0-20; strongest at step" in text
    assert "first effect at step 30: gap" in text and "+-" in text and "of the largest gap" in text


def test_a_node_emerges_when_its_own_ablation_share_stays_material_not_with_its_first_edge():
    from circuits.tracking import circuit_series

    spec = GraphSpec(1, 2, has_mlp=False)  # writers: input, a0.h0, a0.h1; readers: q/k/v of both heads, logits
    n = len(STEPS)
    masks = np.zeros((n, *spec.shape), dtype=bool)
    head, logits = spec.forward_index("a0.h1"), spec.backward_index("logits")
    masks[1:, head, logits] = True  # a0.h1 -> logits is in the circuit from step 10
    masks[:, 0, logits] = True
    scores = masks * -1.0
    gap = np.full(n, 2.0)
    effects = np.zeros((n, spec.n_forward))
    effects[:, head] = [0.0, -0.01, -0.05, -1.0, -1.2]  # its share: 0.5% and 2.5% of the final 60% before step 30
    effects[:, 0] = -2.0
    c = circuit_series(STEPS, scores, masks, list(spec.forward_names), list(spec.backward_names), gap=gap,
                       node_effects=effects)
    emerged = dict(c.emergence_order())
    assert emerged["a0.h1"] == 30 and c.edge_emergence[head, logits] == 10
    np.testing.assert_allclose(c.node_shares[:, head], effects[:, head] / 2.0)
    assert emerged["logits"] == 0 and emerged["input"] == 0  # logits has no ablation effect: it emerges with its edges
