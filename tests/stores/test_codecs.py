"""Codecs on real teacher outputs (Lite0 with its ImageNet-1k head, real images): top-k logits at both
precisions and index codings, sampled logits (keyed draws, unbiased where top-k is not), int8/fp16 embeddings and
feature maps, and every registered codec's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reinforce.augment import create_policy
from reinforce.sources import open_source
from stores._philox import philox_uniform
from stores.codecs import (
    EmbeddingCodec,
    PatchCodec,
    SampledLogitsCodec,
    TopKLogitsCodec,
    bias_z2_per_dof,
    create_codec,
    list_codecs,
)

KINDS = ("logits", "embedding", "patch")


def views_of(spec: str, views_per_sample: int, size: int) -> list[torch.Tensor]:
    policy = create_policy("rrc_flip_randaug", size=size)
    source, views = open_source(spec), []
    for i in range(len(source)):
        image = source.load(i)
        views.extend(policy.apply(image, policy.sample(0, i, v, *image.shape[-2:])) for v in range(views_per_sample))
    return views


@pytest.fixture(scope="module")
def outputs(lite0_teacher, photo_dir) -> dict[str, torch.Tensor]:
    """One forward over 144 augmented 64 px views of Fashion-MNIST images and real photos: logits ``[N, 1000]``,
    embedding ``[N, 1280]``, patch ``[N, 1280, 2, 2]``, plus ``patch4``: 4x4 maps of the photos at 128 px and
    ``seg_logits``: the ImageNet head at each of their positions ``[n, 1000, 4, 4]``."""
    model = lite0_teacher[0]
    views = views_of("fashion-mnist:test?limit=48", 2, 64) + views_of(f"folder:{photo_dir}", 8, 64)
    with torch.inference_mode():
        found = model.forward_targets(torch.stack(views), KINDS)
        large = torch.stack(views_of(f"folder:{photo_dir}", 4, 128))
        found["patch4"] = model.forward_targets(large, ("patch",))["patch"]
        found["seg_logits"] = model.head(found["patch4"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per position
    return {name: value.float() for name, value in found.items()}


EXAMPLES = {  # registered codec -> (arguments, the teacher output it encodes); a new codec needs an entry here
    "topk_logits": ({"k": 10, "num_classes": 1000, "precision": "uint8", "index_coding": "delta"}, "logits"),
    "embedding": ({"dim": 1280, "precision": "int8"}, "embedding"),
    "patch": ({"channels": 1280, "grid": 2, "precision": "int8"}, "patch4"),
    "seg_topk_logits": ({"k": 5, "num_classes": 1000, "height": 4, "width": 4}, "seg_logits"),
    "sampled_logits": ({"samples": 8, "num_classes": 1000, "proposal_temperature": 2.0}, "logits"),
}


def view_keys(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` (seed, sample, view) keys: n samples, view 0."""
    return np.stack([np.full(n, seed), np.arange(n), np.zeros(n, dtype=np.int64)], 1)


@pytest.mark.parametrize("name", list_codecs())
def test_every_registered_codec_keeps_its_contract(outputs, name):
    """Rebuilt from its stored dict; encodes to exactly the arrays it declares; decodes to float32."""
    assert name in EXAMPLES, f"codec {name!r} is registered but has no example in this test"
    args, kind = EXAMPLES[name]
    codec = create_codec(name, **args)
    assert create_codec(**codec.to_dict()) == codec
    x = outputs[kind]
    payload = codec.encode(x, view_keys(len(x)))
    declared = codec.arrays()
    assert sorted(payload) == sorted(declared)
    for array, (shape, dtype) in declared.items():
        assert payload[array].shape == (len(x), *shape) and payload[array].dtype == dtype, array
    assert codec.bytes_per_view == sum(a[0].nbytes for a in payload.values())
    decoded = codec.decode({array: torch.from_numpy(a) for array, a in payload.items()})
    assert decoded.dtype == torch.float32 and decoded.shape[0] == len(x)
    for array, values in payload.items():  # what it writes passes what readers check; NaN never does
        codec.check(array, values)
        if values.dtype.kind == "f":
            with pytest.raises(ValueError, match="NaN or infinite"):
                codec.check(array, np.full_like(values, np.nan))
    if "index" in payload:  # a class index the codec cannot hold is refused, not scattered out of range
        wrong = payload["index"].astype(np.int64)
        wrong[..., 0] = args["num_classes"]
        with pytest.raises(ValueError, match=rf"outside \[0, {args['num_classes']}\)"):
            codec.check("index", wrong)


def test_codec_errors_name_what_is_valid():
    registered = "embedding, patch, sampled_logits, seg_topk_logits, topk_logits"
    with pytest.raises(ValueError, match=f"unknown codec 'topk8'; registered: {registered}"):
        create_codec("topk8")
    with pytest.raises(ValueError, match=r"unknown \['bits'\]"):
        create_codec("embedding", dim=4, bits=8)
    with pytest.raises(ValueError, match=r"precision must be one of \('fp16', 'uint8'\), got 'int4'"):
        TopKLogitsCodec(k=5, num_classes=10, precision="int4")
    with pytest.raises(ValueError, match="codec expects 1000 classes, teacher gave 10"):
        TopKLogitsCodec(k=5, num_classes=1000).encode(torch.randn(2, 10))


def mean_fidelity(codec, x: torch.Tensor) -> dict[str, float]:
    return {metric: values.mean().item() for metric, values in codec.fidelity(x).items()}


@pytest.mark.parametrize("precision", ["fp16", "uint8"])
def test_topk_fidelity_improves_with_k(outputs, precision):
    logits = outputs["logits"]
    assert logits.shape[1] == 1000
    results = {k: mean_fidelity(TopKLogitsCodec(k=k, num_classes=1000, precision=precision), logits)
               for k in (1, 5, 10)}
    print(f"\n{precision} top-k fidelity on {len(logits)} real Lite0 views (1000 classes):")
    for k, result in results.items():
        print(f"  top-{k:<2d}  KL {result['kl']:.4f}  top-1 agreement {result['top1_agreement']:.4f}")
    kls = [results[k]["kl"] for k in (1, 5, 10)]
    assert kls[0] > kls[1] > kls[2] >= 0 and kls[2] < 0.5
    assert all(result["top1_agreement"] == 1.0 for result in results.values())


def test_fidelity_bound_at_the_builds_default_k(outputs):
    """The default store (``reinforce.build``'s --topk, uint8) keeps real 1000-class Lite0 views within 0.25 nats of
    KL on average (measured 0.17 at k=5; a flat view reaches 1.6) and never flips their top-1: a smaller default
    k would break this."""
    from reinforce.build import BuildConfig

    defaults = BuildConfig(teacher="", transfer_set="", out="")
    codec = TopKLogitsCodec(k=defaults.topk, num_classes=1000, precision=defaults.logit_precision)
    fidelity = codec.fidelity(outputs["logits"])
    assert fidelity["kl"].mean().item() < 0.25, fidelity["kl"].mean()
    assert fidelity["top1_agreement"].min().item() == 1.0


def test_uint8_top5_is_as_faithful_as_fp16(outputs):
    """uint8 values relative to the view's max lose at most 0.01 nats of KL against exact fp16 top-5."""
    fp16, uint8 = (mean_fidelity(TopKLogitsCodec(k=5, num_classes=1000, precision=p), outputs["logits"])["kl"]
                   for p in ("fp16", "uint8"))
    assert uint8 <= fp16 + 0.01, (uint8, fp16)


@pytest.mark.parametrize("precision", ["fp16", "uint8"])
def test_decode_is_a_distribution_at_any_temperature(outputs, precision):
    """Decoded log-probabilities sum to one at T=1 and the target softmax(dense / T) keeps the teacher's top-k order."""
    logits = outputs["logits"]
    codec = TopKLogitsCodec(k=5, num_classes=1000, precision=precision)
    dense = codec.round_trip(logits)
    sums = dense.exp().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0)
    order = logits.topk(5).indices
    for temperature in (1.0, 2.0, 4.0):
        target = torch.softmax(dense / temperature, -1)
        assert torch.isfinite(target).all()
        torch.testing.assert_close(target.sum(-1), torch.ones_like(sums), atol=1e-5, rtol=0)
        ranked = target.gather(1, order)
        assert (ranked[:, :-1] >= ranked[:, 1:]).all()


@pytest.mark.parametrize("precision", ["fp16", "uint8"])
@pytest.mark.parametrize("index_coding", ["delta", "plain"])
def test_index_coding_round_trips_exactly(outputs, precision, index_coding):
    """Decoded classes are torch.topk's (delta: as a sorted set) and carry their log-probabilities."""
    logits = outputs["logits"]
    codec = TopKLogitsCodec(k=10, num_classes=1000, precision=precision, index_coding=index_coding)
    payload = {name: torch.from_numpy(a.astype(np.int32) if a.dtype == np.uint16 else a)
               for name, a in codec.encode(logits).items()}
    index, log_p = codec.log_probs(payload)
    expected = logits.topk(10).indices
    assert torch.equal(index, expected.sort(-1).values if index_coding == "delta" else expected)
    exact = torch.log_softmax(logits, -1).gather(1, index)
    if precision == "fp16":  # raw logits rounded to fp16 (half an ulp), exact fp32 log-sum-exp
        bound = logits.gather(1, index).abs() * 2**-11
    else:  # the largest square-root-companded step (at the bottom of the range), plus lse's fp16 rounding
        step = payload["scale"].float()[:, None] / (2**codec.value_bits - 1)
        bound = step + payload["lse"].float().abs()[:, None] * 2**-11
    assert ((log_p - exact).abs() <= bound + 1e-5).all()


@pytest.mark.parametrize("index_coding", ["delta", "plain"])
def test_wide_heads_get_int32_indices(index_coding):
    logits = torch.randn(4, 70_000, generator=torch.Generator().manual_seed(0))
    codec = TopKLogitsCodec(k=3, num_classes=70_000, index_coding=index_coding)
    payload = codec.encode(logits)
    assert codec.arrays()["index"][1] == np.dtype(np.int32) and payload["index"].dtype == np.int32
    index, _ = codec.log_probs({name: torch.from_numpy(a) for name, a in payload.items()})
    expected = logits.topk(3).indices
    assert torch.equal(index, expected.sort(-1).values if index_coding == "delta" else expected)
    assert TopKLogitsCodec(k=3, num_classes=65535).index_dtype == np.dtype(np.uint16)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_embedding_round_trip_cosine(outputs, precision):
    embedding = outputs["embedding"]
    assert embedding.shape[1] == 1280
    cosine = EmbeddingCodec(dim=1280, precision=precision).fidelity(embedding)["cosine"]
    assert len(cosine) == len(embedding) and cosine.mean() >= 0.999 and cosine.min() >= 0.999
    if precision == "fp16":
        assert cosine.min() >= 0.99999


@pytest.mark.parametrize("precision", ["int8", "fp16"])
@pytest.mark.parametrize(("maps", "grid"), [("patch", 2), ("patch4", 4), ("patch4", 2)])
def test_patch_round_trip_cosine(outputs, precision, maps, grid):
    """Feature maps as stored (4x4 maps pooled to 2x2 by definition of the target): every position vector
    survives int8 with cosine >= 0.999 against the pooled map."""
    x = outputs[maps]
    codec = PatchCodec(channels=1280, grid=grid, precision=precision)
    cosine = codec.fidelity(x)["cosine"]
    assert len(cosine) == len(x) * grid * grid and cosine.mean() >= 0.999 and cosine.min() >= 0.999
    decoded = codec.round_trip(x)
    assert decoded.shape == (len(x), 1280, grid, grid)
    torch.testing.assert_close(codec.pool(x), F.adaptive_avg_pool2d(x, grid))


def test_philox_uniform_is_numpys_philox_stream():
    """The vectorised Philox draws exactly what ``np.random.Generator(np.random.Philox(key, counter)).random()``
    draws, row by row (so the keying is the documented generator's, not a look-alike)."""
    key = np.array([[0, 12], [7, 3], [2**40, 99]], dtype=np.uint64)
    counter = np.array([[0, 1, 3, 0], [0, 1, 0, 0], [5, 1, 2, 0]], dtype=np.uint64)
    drawn = philox_uniform(key, counter, 11)
    for row in range(len(key)):
        expected = np.random.Generator(np.random.Philox(key=key[row], counter=counter[row])).random(11)
        assert np.array_equal(drawn[row], expected)


def test_sampled_payload_is_keyed_counted_and_decodes_to_the_empirical_distribution(outputs):
    logits = outputs["logits"]
    codec = SampledLogitsCodec(samples=16, num_classes=1000)
    payload = codec.encode(logits, view_keys(len(logits)))
    assert (payload["count"].astype(int).sum(-1) == 16).all()
    index = np.cumsum(payload["index"].astype(np.int64), -1)
    counted = payload["count"] > 0
    for row, used in zip(index, counted):  # distinct ids, ascending; padding repeats the last id with count 0
        assert (np.diff(row[used]) > 0).all() and (row[~used] == row[used][-1]).all()
    again = codec.encode(logits, view_keys(len(logits)))
    assert all(np.array_equal(payload[a], again[a]) for a in payload)  # same keys, same draws
    other = codec.encode(logits, view_keys(len(logits), seed=1))
    assert not np.array_equal(payload["index"], other["index"])
    decoded = codec.decode({a: torch.from_numpy(v.astype(np.int32) if v.dtype == np.uint16 else v)
                            for a, v in payload.items()})
    torch.testing.assert_close(decoded.sum(-1), torch.ones(len(logits)))
    dense = np.zeros((len(logits), 1000))
    np.add.at(dense, (np.arange(len(logits))[:, None], index), payload["count"] / 16)
    torch.testing.assert_close(decoded, torch.from_numpy(dense).float())
    fidelity = codec.fidelity(logits, view_keys(len(logits)))
    assert fidelity["tv"].max() < 1 and (fidelity["kl_empirical"] >= 0).all()
    with pytest.raises(ValueError, match=r"encode needs keys \[B, 3\]"):
        codec.encode(logits)


def redrawn(codec, logits: torch.Tensor, redraws: int) -> torch.Tensor:
    """Decoded targets of every view summed over ``redraws`` differently keyed draws, ``[C]`` float64."""
    return sum(codec.round_trip(logits, view_keys(len(logits), seed)).double().sum(0) for seed in range(redraws))


def test_sampled_targets_average_to_the_teacher_where_top_k_does_not(outputs):
    """Pooled over 200 draws of each of 144 real views, 4-sample targets deviate from the teacher's probabilities
    as much as multinomial noise does (z²/dof ≈ 1); top-5 targets (pseudo-counts at the same N) by far more."""
    logits = outputs["logits"]
    teacher = torch.softmax(logits, -1)
    sampled = bias_z2_per_dof(redrawn(SampledLogitsCodec(samples=4, num_classes=1000), logits, 200), teacher, 4,
                              repeats=200)
    top5 = TopKLogitsCodec(k=5, num_classes=1000)
    biased = bias_z2_per_dof(200 * top5.round_trip(logits).exp().double().sum(0), teacher, 4, repeats=200)
    print(f"\nz²/dof over 200 x {len(logits)} views: sampled N=4 {sampled:.2f}, top-5 {biased:.2f}")
    assert 0.5 < sampled < 1.5 < biased


def test_a_tempered_proposal_stays_unbiased_through_its_weights(outputs):
    """Drawn at T=3 with log p/q stored (p at T=1): the weighted targets average to the T=1 teacher (total
    variation of the pooled mean well below the proposal's own and top-5's bias)."""
    logits = outputs["logits"]
    teacher = torch.softmax(logits, -1).double().mean(0)
    codec = SampledLogitsCodec(samples=8, num_classes=1000, proposal_temperature=3.0)
    weighted = redrawn(codec, logits, 200) / (200 * len(logits))
    unweighted = redrawn(SampledLogitsCodec(samples=8, num_classes=1000, temperature=3.0), logits, 200)
    top5 = TopKLogitsCodec(k=5, num_classes=1000).round_trip(logits).exp().double().mean(0)
    tv = {name: 0.5 * (mean - teacher).abs().sum().item() for name, mean in
          (("weighted", weighted), ("proposal", unweighted / (200 * len(logits))), ("top5", top5))}
    print(f"\nTV(pooled mean, teacher): {tv}")
    assert tv["weighted"] < tv["top5"] / 2 and tv["weighted"] < tv["proposal"] / 4
