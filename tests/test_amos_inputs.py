"""The AMOS configurations' network inputs (:mod:`gcinfer.pipelines.amos.inputs`): one preprocessing for
configurations that nnU-Net v1 preprocesses identically (checked against nnU-Net's own ``resample_and_normalize``,
and shown wrong where it would not be), the next configuration preprocessed in the background, and the memory plan
that accounts for both. The end-to-end check (same bytes with the overlap on and off) is in ``test_amos.py``."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch
from test_memory import nnunet_configuration

from gcinfer import memory
from gcinfer.engine.tiling import NnunetTiling, predict_tiled
from gcinfer.errors import InputError
from gcinfer.io import Geometry
from gcinfer.pipelines.amos import memory as amos_memory
from gcinfer.pipelines.amos import nnunet_v1
from gcinfer.pipelines.amos.inputs import NetworkInputs, input_sources, preprocessing_of

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GIB = memory.GIB
CT_SPACING = (1.25, 0.78, 0.78)  # z, y, x: nnU-Net's GenericPreprocessor resamples it in 3D


def ct_crop(spacing_zyx=CT_SPACING, shape=(14, 30, 26)) -> nnunet_v1.Cropped:
    """A CT-like image (air -1000 around a body, a column of zeros at a corner: outside nnU-Net's non-zero mask)
    cropped as nnU-Net crops it."""
    rng = np.random.default_rng(1)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[2:-2, 4:-4, 3:-3] = rng.normal(40, 200, (shape[0] - 4, shape[1] - 8, shape[2] - 6))
    image[:, :5, :5] = 0
    geometry = Geometry(shape[::-1], spacing_zyx[::-1], (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return nnunet_v1.crop(image[None], geometry)


def task1_like(spacing_target=(1.5, 1.0, 1.0)) -> list[nnunet_v1.Configuration]:
    """AMOS task 1's order: a ``Preprocessor3DBetterResampling`` configuration, one of another spacing, then a
    ``GenericPreprocessor`` one at the first one's spacing."""
    return [
        nnunet_configuration("Preprocessor3DBetterResampling", spacing_target, (8, 8, 8)),
        nnunet_configuration("Preprocessor3DBetterResampling", (2.0, 0.68825, 0.68825), (8, 8, 8)),
        nnunet_configuration("GenericPreprocessor", spacing_target, (8, 8, 8)),
    ]


def test_configurations_nnunet_preprocesses_alike_share_one_input() -> None:
    """The third configuration takes the first one's input, and nnU-Net's own preprocessing of both is byte-equal."""
    configurations, cropped = task1_like(), ct_crop()
    assert input_sources(configurations, CT_SPACING, 1) == [0, 1, 0]
    first, third = (configurations[i].preprocess(cropped).data for i in (0, 2))
    assert first.dtype == third.dtype == np.float32 and first.shape == third.shape
    assert first.tobytes() == third.tobytes()


def with_preprocessor(configuration: nnunet_v1.Configuration, **changes) -> nnunet_v1.Configuration:
    preprocessor = copy.deepcopy(configuration.preprocessor)
    vars(preprocessor).update(changes)
    return dataclasses.replace(configuration, preprocessor=preprocessor)


@pytest.mark.parametrize(
    ("change", "spacing_zyx", "nnunet_differs"),
    [
        ("none", (4.0, 0.8, 0.8), True),  # GenericPreprocessor resamples z apart (nearest), the other in 3D
        ("target spacing", CT_SPACING, True),
        ("intensity properties", CT_SPACING, True),
        ("z-score scheme", CT_SPACING, None),  # reads the mask: never shared, whether equal or not
        ("masked normalisation", CT_SPACING, True),
    ],
)
def test_configurations_preprocessed_otherwise_are_not_shared(change, spacing_zyx, nnunet_differs) -> None:
    first, _, third = task1_like()
    if change == "target spacing":
        third = dataclasses.replace(third, target_spacing=np.array([1.5, 1.0, 0.9]))
    elif change == "intensity properties":
        properties = copy.deepcopy(third.preprocessor.intensityproperties)
        properties[0]["sd"] = 119.0
        third = with_preprocessor(third, intensityproperties=properties)
    elif change == "z-score scheme":
        first, third = (with_preprocessor(c, normalization_scheme_per_modality={0: "nonCT"}) for c in (first, third))
    elif change == "masked normalisation":
        third = with_preprocessor(third, use_nonzero_mask={0: True})
    assert input_sources([first, third], spacing_zyx, 1) == [0, 1]
    cropped = ct_crop(spacing_zyx)
    if nnunet_differs is not None:
        differs = first.preprocess(cropped).data.tobytes() != third.preprocess(cropped).data.tobytes()
        assert differs == nnunet_differs


def test_an_unknown_preprocessor_class_is_never_shared() -> None:
    class Custom(type(task1_like()[2].preprocessor)):
        pass

    first, _, third = task1_like()
    preprocessor = copy.copy(third.preprocessor)
    preprocessor.__class__ = Custom
    custom = dataclasses.replace(third, preprocessor=preprocessor)
    assert preprocessing_of(first, CT_SPACING, 1) is not None
    assert preprocessing_of(custom, CT_SPACING, 1) is None


class Recorder:
    """Wraps ``Configuration.preprocess``: which configuration ran on which thread, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        original = nnunet_v1.Configuration.preprocess

        def preprocess(configuration, cropped):
            self.calls.append((configuration.name, threading.current_thread().name))
            if configuration.name == fail:
                raise InputError(f"case.nii.gz: {fail} failed")
            return original(configuration, cropped)

        monkeypatch.setattr(nnunet_v1.Configuration, "preprocess", preprocess)


def named(configurations: list[nnunet_v1.Configuration]) -> list[nnunet_v1.Configuration]:
    return [dataclasses.replace(c, name=f"c{i}") for i, c in enumerate(configurations)]


@pytest.mark.parametrize("overlap", [False, True])
def test_network_inputs_preprocess_each_distinct_input_once(monkeypatch, overlap: bool) -> None:
    configurations, cropped = named(task1_like()), ct_crop()
    expected = [c.preprocess(cropped).data for c in configurations]
    recorder = Recorder(monkeypatch)
    taken = []
    with NetworkInputs(cropped, configurations, overlap=overlap) as inputs:
        for index, configuration in enumerate(configurations):
            taken.append(inputs.take(index))
            # predicted on as the pipeline does (on the CPU the tensor is the array): the shared input stays intact
            predict_tiled(
                torch.from_numpy(taken[-1]),
                configuration.networks,
                configuration.patch_size,
                NnunetTiling(0.5),
                mirror_axes=(0, 1, 2),
                progress=False,
            )
    assert all(a.tobytes() == b.tobytes() for a, b in zip(taken, expected))
    assert taken[2] is taken[0]
    main = threading.current_thread().name
    assert recorder.calls == [("c0", main), ("c1", "preprocess 1" if overlap else main)]


def test_overlap_runs_the_next_preprocessing_while_the_caller_goes_on(monkeypatch) -> None:
    configurations, cropped = named(task1_like()[:2]), ct_crop()
    started, release = threading.Event(), threading.Event()
    original = nnunet_v1.Configuration.preprocess

    def preprocess(configuration, crop):
        if configuration.name == "c1":
            started.set()
            assert release.wait(30)
        return original(configuration, crop)

    monkeypatch.setattr(nnunet_v1.Configuration, "preprocess", preprocess)
    with NetworkInputs(cropped, configurations, overlap=True) as inputs:
        inputs.take(0)
        assert started.wait(30)  # configuration 1 is being preprocessed while configuration 0 is in the caller's hands
        release.set()
        assert inputs.take(1).shape[0] == 1


def test_a_background_failure_is_raised_where_its_input_is_taken(monkeypatch) -> None:
    configurations, cropped = named(task1_like()[:2]), ct_crop()
    Recorder(monkeypatch, fail="c1")
    with NetworkInputs(cropped, configurations, overlap=True) as inputs:
        inputs.take(0)
        with pytest.raises(InputError, match=r"^case.nii.gz: c1 failed$"):
            inputs.take(1)


def test_an_error_during_prediction_waits_for_the_background_preprocessing(monkeypatch) -> None:
    configurations, cropped = named(task1_like()[:2]), ct_crop()
    finished = threading.Event()
    original = nnunet_v1.Configuration.preprocess

    def preprocess(configuration, crop):
        result = original(configuration, crop)
        if configuration.name == "c1":
            finished.set()
        return result

    monkeypatch.setattr(nnunet_v1.Configuration, "preprocess", preprocess)
    with pytest.raises(RuntimeError), NetworkInputs(cropped, configurations, overlap=True) as inputs:
        inputs.take(0)
        raise RuntimeError("prediction failed")
    assert finished.is_set()


def test_quiet_restores_stdout_whatever_order_threads_leave_in(capsys) -> None:
    import sys

    real = sys.stdout
    first, second = nnunet_v1.quiet(), nnunet_v1.quiet()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.stdout is not real  # the second block is still open
    second.__exit__(None, None, None)
    assert sys.stdout is real


# --- the memory plan --------------------------------------------------------------------------------------------------


def full_size_case(sources=(None, None, 0)) -> amos_memory.AmosCase:
    """AMOS task 1's three configurations at full size, in its order, the third taking the first one's input."""
    shape, spacing, cost = (600, 512, 512), CT_SPACING, memory.NetworkCost(288 * 2**20, 1400 * 2**20, 144 * 2**20)
    configurations = tuple(
        amos_memory.AmosConfiguration(
            memory.Tiling(amos_memory.nnunet_network_shape(shape, spacing, target, (0, 1, 2)), patch, 16, 1, True),
            False,
            cost,
            5,
            source,
        )
        for (target, patch), source in zip(
            (((1.5, 1, 1), (160,) * 3), ((2, 0.688, 0.688), (80, 192, 192)), ((1.5, 1, 1), (160,) * 3)), sources
        )
    )
    return amos_memory.AmosCase(shape, 2, 16, configurations)


def buffers_of(case: amos_memory.AmosCase, choice: memory.Choice, phase: str) -> dict[str, int]:
    (found,) = [p for p in amos_memory.amos_phases(case, choice) if p.name == phase]
    return {b.name: b.nbytes for b in found.buffers}


def test_the_plan_counts_the_kept_input_and_the_background_preprocessing() -> None:
    shared, overlapped = full_size_case(), memory.Choice(torch.float32, torch.float32, True, False, 1, True)
    nt = 500 * 399 * 399  # configuration 1's grid at 1.5 x 1 x 1 mm: round(600 * 1.25 / 1.5), round(512 * 0.78)
    assert buffers_of(shared, overlapped, "preprocess 3")["preprocessing"] == 0
    for phase in ("predict 1", "resample 1", "predict 2", "preprocess 2"):
        assert buffers_of(shared, overlapped, phase)["input of 1 kept"] == 4 * nt
    assert "input of 1 kept" not in buffers_of(shared, overlapped, "predict 3")
    assert buffers_of(shared, overlapped, "predict 1")["next preprocessing"] > 0  # configuration 2's
    assert "next preprocessing" not in buffers_of(shared, overlapped, "predict 2")  # 3 needs none of its own
    alone = dataclasses.replace(overlapped, overlap=False)
    assert "next preprocessing" not in buffers_of(shared, alone, "predict 1")


def test_the_plan_counts_the_next_case_read_ahead_from_the_first_prediction_on() -> None:
    """Overlapped, the next case's image (its SimpleITK image and numpy copy) is held from the first prediction to the
    end of the case; not before (the first preprocessing, the host's peak, runs without it), not unoverlapped."""
    upcoming = 512 * 512 * 300 * 2
    case = dataclasses.replace(full_size_case(), upcoming_image_bytes=upcoming)
    overlapped = memory.Choice(torch.float32, torch.float32, True, False, 1, True)
    phases = [p.name for p in amos_memory.amos_phases(case, overlapped)]
    first_prediction = phases.index("predict 1")
    for number, phase in enumerate(phases):
        held = buffers_of(case, overlapped, phase).get("next case's image")
        assert held == (2 * upcoming if number >= first_prediction else None), phase
    alone = dataclasses.replace(overlapped, overlap=False)
    assert all("next case's image" not in buffers_of(case, alone, phase) for phase in phases)
    assert all("next case's image" not in buffers_of(full_size_case(), overlapped, phase) for phase in phases)


def test_overlap_is_given_up_before_anything_else() -> None:
    """A budget between the overlapped and the plain estimate keeps the best precision and placement, unoverlapped."""
    case = full_size_case()
    best = memory.Choice(torch.float32, torch.float32, True, False, 1)
    phases = lambda overlap: amos_memory.amos_phases(case, dataclasses.replace(best, overlap=overlap))  # noqa: E731
    plain, overlapped = (memory.estimate(phases(o), shared=False) for o in (False, True))
    assert overlapped.host > plain.host
    budget = memory.Budget(memory.T4_FREE_BYTES, (plain.host + overlapped.host) // 2)
    assert amos_memory.plan_amos("case", case, 2, budget, CUDA, overlap=True).choice == best
    roomy = memory.Budget(memory.T4_FREE_BYTES, overlapped.host)
    plan = amos_memory.plan_amos("case", case, 2, roomy, CUDA, overlap=True)
    assert plan.choice == dataclasses.replace(best, overlap=True)
    assert plan.line().startswith(
        "case: memory plan: tiling fp32 on cuda, ensemble fp32 on host, 1 tile(s)/batch, host work overlapped |"
    )
