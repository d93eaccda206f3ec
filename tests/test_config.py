"""KernelConfig (validation, serialization, keyword overrides), compute / KernelBlocks, and Featurizer."""

from __future__ import annotations

import json

import pytest
import torch

import tangentlens as tl
from tangentlens.errors import InputError, UnknownKindError

from .models import cnn, data, mlp
from .oracles import oracle_kernel, to64

X = data("mlp", 12)
XT = data("mlp", 5, seed=1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return to64(mlp())


def test_round_trip_through_json_including_the_projection() -> None:
    cfg = tl.KernelConfig(kind="pntk", normalize=True, parameters=["0.weight", "2"], probes=2, probe_seed=3,
                          projection=tl.Projection(64, kind="sjlt", seed=5), dtype=torch.float64,
                          batch_size=7, memory_budget=2**28)
    back = tl.KernelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.projection == tl.Projection(64, kind="sjlt", seed=5)
    assert back.dtype == "float64" and back.torch_dtype is torch.float64


def test_probe_matrix_round_trips() -> None:
    P = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    cfg = tl.KernelConfig(kind="trntk0", probes=P)
    back = tl.KernelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and torch.equal(back.probe_matrix, P.double())


def test_config_call_equals_keyword_call(model: torch.nn.Module) -> None:
    cfg = tl.KernelConfig(kind="trntk0", batch_size=5, parameters=("2.weight", "4"))
    by_config = tl.kernel(model, X, config=cfg)
    by_keywords = tl.kernel(model, X, kind="trntk0", batch_size=5, parameters=["2.weight", "4"])
    assert torch.equal(by_config, by_keywords)


def test_keywords_override_the_config(model: torch.nn.Module) -> None:
    cfg = tl.KernelConfig(kind="trntk0", batch_size=5)
    K = tl.kernel(model, X, config=cfg, normalize=True)
    torch.testing.assert_close(K, tl.kernel(model, X, kind="trntk"))
    torch.testing.assert_close(tl.kernel(model, X, config=cfg, kind="pntk"), tl.kernel(model, X, kind="pntk"))


def test_a_new_kind_drops_the_options_it_does_not_accept() -> None:
    em = tl.KernelConfig(kind="em", modules=["0"])
    assert tl.KernelConfig.resolve(em, kind="trntk").modules is None
    proj = tl.KernelConfig(kind="trntk", projection=tl.Projection(16))
    assert tl.KernelConfig.resolve(proj, kind="pntk").projection == tl.Projection(16)


def test_inapplicable_option_is_a_typed_error_naming_the_kinds() -> None:
    with pytest.raises(InputError, match=r"modules= applies only to the embedding kind \('em'\)"):
        tl.KernelConfig(kind="trntk", modules=["0"])
    with pytest.raises(InputError, match="probes= applies only to the trace kinds"):
        tl.KernelConfig(kind="gradcos", probes=2)
    with pytest.raises(UnknownKindError):
        tl.KernelConfig(kind="ntk")


def test_bad_values_and_unknown_options_are_typed_errors(model: torch.nn.Module) -> None:
    for bad in (dict(batch_size=0), dict(dtype="int8"), dict(implementation="jit"), dict(normalize="yes"),
                dict(memory_budget=-1), dict(probes=0), dict(parameters=[model])):
        with pytest.raises(InputError):
            tl.KernelConfig(**bad)
    with pytest.raises(InputError, match="Unknown option.*'batchsize'"):
        tl.kernel(model, X, batchsize=4)
    with pytest.raises(InputError, match="config must be a tangentlens.KernelConfig"):
        tl.kernel(model, X, config={"kind": "trntk"})


def test_model_objects_are_recorded_by_name(model: torch.nn.Module) -> None:
    K = tl.kernel(model, X, kind="trntk0", parameters=[model[4]])
    torch.testing.assert_close(K, tl.kernel(model, X, kind="trntk0", parameters=["4.weight", "4.bias"]))


def test_fingerprint_ignores_execution_settings_only() -> None:
    a = tl.KernelConfig(kind="trntk")
    assert a.fingerprint() == tl.KernelConfig(kind="trntk", batch_size=3, memory_budget=2**30).fingerprint()
    assert a.fingerprint() == tl.KernelConfig(kind="trntk", normalize=True).fingerprint()  # the default
    assert a.fingerprint() != tl.KernelConfig(kind="trntk0").fingerprint()
    assert a.fingerprint() != tl.KernelConfig(kind="trntk", projection=tl.Projection(32)).fingerprint()


def test_compute_returns_raw_blocks_with_their_diagonals(model: torch.nn.Module) -> None:
    b = tl.compute(model, X, XT, kind="trntk0", batch_size=4)
    torch.testing.assert_close(b.train, oracle_kernel(model, X, kind="trntk0"))
    torch.testing.assert_close(b.test, oracle_kernel(model, XT, X, kind="trntk0"))
    torch.testing.assert_close(b.train_diag, torch.diagonal(b.train))
    torch.testing.assert_close(b.test_diag, torch.diagonal(oracle_kernel(model, XT, kind="trntk0")))
    assert b.form == "raw" and b.config.kind == "trntk0"


def test_normalized_blocks_are_the_trace_ntk_without_recomputation(model: torch.nn.Module) -> None:
    n = tl.compute(model, X, XT, kind="trntk0").normalized()
    K, Kt = tl.train_test_kernels(model, X, XT, kind="trntk")
    torch.testing.assert_close(n.train, K)
    torch.testing.assert_close(n.test, Kt)
    assert torch.equal(torch.diagonal(n.train), torch.ones(len(X), dtype=n.train.dtype))


def test_scaled_blocks_divide_by_the_train_spread(model: torch.nn.Module) -> None:
    b = tl.compute(model, X, XT, kind="trntk0")
    s = b.scaled()
    sd = b.train.std()
    torch.testing.assert_close(s.train, b.train / sd)
    torch.testing.assert_close(s.test, b.test / sd)
    with pytest.raises(InputError, match="derives from the raw blocks"):
        s.normalized()


def test_kernels_follow_the_configs_normalization(model: torch.nn.Module) -> None:
    b = tl.compute(model, X, XT, kind="pntk", normalize=True)
    K, Kt = tl.train_test_kernels(model, X, XT, kind="pntk", normalize=True)
    torch.testing.assert_close(b.kernels()[0], K)
    torch.testing.assert_close(b.kernels()[1], Kt)


def test_compute_with_a_projection_gives_feature_products(model: torch.nn.Module) -> None:
    proj = tl.Projection(32, seed=1)
    b = tl.compute(model, X, XT, kind="trntk", projection=proj)
    F, Ft = (tl.features(model, z, kind="trntk", normalize=False, projection=proj) for z in (X, XT))
    torch.testing.assert_close(b.train, F @ F.T)
    torch.testing.assert_close(b.test, Ft @ F.T)
    torch.testing.assert_close(b.normalized().test, tl.train_test_kernels(model, X, XT, projection=proj)[1])


def test_compute_without_test_points(model: torch.nn.Module) -> None:
    b = tl.compute(model, X, kind="trntk0")
    assert b.test is None and b.test_diag is None
    assert b.normalized().test is None


def test_featurizer_blocks_equal_features() -> None:
    m = to64(cnn())
    x = data("cnn", 9)
    cfg = tl.KernelConfig(kind="pntk", batch_size=4)
    with tl.Featurizer(m, cfg) as f:
        rows = torch.cat([b for _, b in f.blocks(x)])
    torch.testing.assert_close(rows, tl.features(m, x, config=cfg))


def test_featurizer_leaves_the_model_untouched_between_blocks() -> None:
    m = to64(cnn()).train()
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    it = tl.iter_features(m, data("cnn", 9), kind="trntk0", batch_size=4)
    next(it)
    assert m.training and not any(mod._forward_hooks for mod in m.modules())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before


def test_featurizer_block_size_is_taken_as_given() -> None:
    m = to64(cnn())
    x = data("cnn", 9)
    with tl.Featurizer(m, tl.KernelConfig(kind="pntk", batch_size=8), block_size=3) as f:
        starts = [s for s, _ in f.blocks(x)]
        assert f.planned_block_size == 3
    assert starts == [0, 3, 6, 8]
