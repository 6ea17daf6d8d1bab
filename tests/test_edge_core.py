"""StreamSplit edge clients, the parts: front end, streams, encoder split, mixture, losses, payloads, splitter."""

import math

import numpy as np
import pytest
import soundfile
import torch

from qfl.clients.edge.costs import CostModel, client_conditions
from qfl.clients.edge.encoder import CodecChannel, SplitEncoder
from qfl.clients.edge.frontend import SAMPLE_RATE, LogMel, read_audio
from qfl.clients.edge.losses import (
    HybridWeights,
    hybrid_loss,
    info_nce,
    sliced_wasserstein_to_uniform,
    temporal_laplacian,
    uniform_sphere,
)
from qfl.clients.edge.mixture import StreamingGMM
from qfl.clients.edge.splitter import (
    RewardWeights,
    SplitSimulator,
    oracle_policy,
    random_policy,
    states,
    static_policy,
    train_ppo,
)
from qfl.clients.edge.stream import FileStream, SyntheticStream, audio_folder_items, esc50_items
from qfl.clients.edge.trainer import SplitTrainer, StreamTraining, train_on_stream
from qfl.compression import make_codec
from qfl.errors import DatasetNotFound

TINY = dict(channels=(4, 4, 8, 8), strides=(1, 2, 1, 2), dim=16)


def _logmel(batch: int = 4, mels: int = 32, frames: int = 41) -> torch.Tensor:
    return torch.randn(batch, 1, mels, frames, generator=torch.Generator().manual_seed(0))


# -- front end and streams ------------------------------------------------------------------------------


def test_logmel_puts_a_tone_in_the_mel_band_of_its_frequency():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    front = LogMel(n_mels=64)
    low = front(torch.from_numpy(np.sin(2 * np.pi * 300 * t).astype(np.float32)))
    high = front(torch.from_numpy(np.sin(2 * np.pi * 3000 * t).astype(np.float32)))
    assert low.shape == (64, 101) and high.shape == (64, 101)
    assert int(low.mean(1).argmax()) < int(high.mean(1).argmax())
    assert torch.isfinite(low).all()


def test_read_audio_mixes_to_mono_and_resamples_to_16k(tmp_path):
    stereo = np.stack([np.linspace(-0.5, 0.5, 8000), np.zeros(8000)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", stereo, 8000)
    soundfile.write(tmp_path / "b.flac", stereo, 8000)
    for name in ("a.wav", "b.flac"):
        audio = read_audio(tmp_path / name)
        assert audio.dtype == np.float32 and audio.shape == (16000,)
        assert abs(float(audio[8000]) - 0.0) < 0.05 and abs(float(audio[4000]) + 0.125) < 0.02


def test_synthetic_stream_is_seeded_ordered_and_labelled():
    stream = SyntheticStream(seed=3)
    waves, labels = stream.windows(1, 4, 0, 40)
    again, labels_again = stream.windows(1, 4, 10, 5)
    np.testing.assert_array_equal(waves[10:15], again)
    np.testing.assert_array_equal(labels[10:15], labels_again)
    assert waves.shape == (40, SAMPLE_RATE) and waves.dtype == np.float32
    assert np.mean(labels[1:] == labels[:-1]) > 0.5  # events span several windows
    other_device, _ = stream.windows(2, 4, 0, 40)
    assert not np.allclose(waves, other_device)
    _, probe_labels = stream.probe_set(200)
    assert len(np.unique(probe_labels)) == stream.num_classes


def test_real_audio_loaders_read_class_folders_and_esc50_csv(tmp_path):
    for label in ("dog", "rain"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            soundfile.write(tmp_path / "folder" / label / f"{i}.wav", np.full(24000, 0.1, np.float32), SAMPLE_RATE)
    items, classes = audio_folder_items(tmp_path / "folder")
    assert classes == ["dog", "rain"] and len(items) == 6
    stream = FileStream(items, 2, seed=0, probe_fraction=0.34)
    waves, labels = stream.windows(0, 2, 0, 5)
    assert waves.shape == (5, SAMPLE_RATE) and set(labels) <= {0, 1}
    probe_waves, probe_labels = stream.probe_set(10)
    assert len(probe_waves) == 2 and sorted(probe_labels) == [0, 1]  # one held-out file per class, one window each

    (tmp_path / "esc" / "audio").mkdir(parents=True)
    rows = ["filename,fold,target,category"]
    for i, target in enumerate((0, 0, 41, 41)):
        soundfile.write(tmp_path / "esc" / "audio" / f"{i}.wav", np.zeros(16000, np.float32), SAMPLE_RATE)
        rows.append(f"{i}.wav,1,{target},{'dog' if target == 0 else 'chainsaw'}")
    (tmp_path / "esc" / "meta.csv").write_text("\n".join(rows) + "\n")
    items, classes = esc50_items(tmp_path / "esc" / "meta.csv")
    assert classes == ["dog", "chainsaw"] and [label for _, label in items] == [0, 0, 1, 1]
    with pytest.raises(DatasetNotFound):
        audio_folder_items(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound):
        esc50_items(tmp_path / "nowhere.csv")


# -- encoder split and payloads --------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(5))
def test_device_then_server_equals_the_unsplit_encoder_at_every_split(k):
    encoder = SplitEncoder(**TINY, seed=1).eval()
    x = _logmel()
    with torch.no_grad():
        whole = encoder(x)
        split = encoder.server_forward(encoder.device_forward(x, k), k)
        lossless = encoder.server_forward(CodecChannel(make_codec("fp32"))(encoder.device_forward(x, k), k), k)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(lossless, whole)
    assert torch.allclose(whole.norm(dim=1), torch.ones(len(x)))


def test_split_out_of_range_is_refused():
    with pytest.raises(ValueError):
        SplitEncoder(**TINY).device_forward(_logmel(), 5)


def test_channel_counts_the_bytes_of_the_payloads_it_sends():
    encoder = SplitEncoder(**TINY)
    x = _logmel()
    for k in range(encoder.depth + 1):
        sent = encoder.device_forward(x, k).detach()
        for name in ("fp32", "fp16", "qsgd"):
            codec = make_codec(name, seed=0)
            channel = CodecChannel(codec)
            channel(sent, k)
            expected = sum(len(make_codec(name, seed=0).encode(s.numpy())) for s in sent)
            per_window = sent[0].numel()
            assert channel.traffic.up == expected == channel.traffic.up_by_k[k]
            assert channel.traffic.windows == len(x)
            if name == "fp32":
                assert 4 * per_window * len(x) < expected <= (4 * per_window + 64) * len(x)
    sizes = {name: CodecChannel(make_codec(name, seed=0)).payload_bytes(x[0]) for name in ("fp32", "fp16", "qsgd")}
    assert sizes["qsgd"] < sizes["fp16"] < sizes["fp32"]


def test_gradients_cross_the_channel_back_and_are_counted():
    encoder = SplitEncoder(**TINY)
    channel = CodecChannel(make_codec("fp16"))
    z = encoder.server_forward(channel(encoder.device_forward(_logmel(), 2), 2), 2)
    z.sum().backward()
    assert channel.traffic.down > 0
    assert encoder.stem.conv.weight.grad is not None and encoder.stem.conv.weight.grad.abs().sum() > 0


def test_mixture_sync_in_fp16_fits_35_kb():
    gmm = StreamingGMM(64, 128)
    fp16 = make_codec("fp16")
    sent = sum(len(fp16.encode(np.ascontiguousarray(a))) for a in gmm.sync_arrays().values())
    assert 2 * (2 * 64 * 128 + 64) <= sent <= 35_000


# -- mixture ---------------------------------------------------------------------------------------------


def test_streaming_em_recovers_known_components():
    rng = np.random.default_rng(0)
    means = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, -2.0, 0]])
    stds = np.array([0.2, 0.3, 0.15])
    weights = np.array([0.5, 0.3, 0.2])

    def draw(n):
        c = rng.choice(3, size=n, p=weights)
        return torch.from_numpy((means[c] + stds[c, None] * rng.standard_normal((n, 4))).astype(np.float32))

    gmm = StreamingGMM(3, 4, rate=0.02, seed=0)
    gmm.initialise_from(draw(300))
    for _ in range(600):
        gmm.update(draw(16))
    order = [int(np.argmin(np.linalg.norm(gmm.means.numpy() - m, axis=1))) for m in means]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(gmm.means.numpy()[order], means, atol=0.1)
    np.testing.assert_allclose(gmm.weights.numpy()[order], weights, atol=0.05)
    np.testing.assert_allclose(np.sqrt(gmm.variances.numpy()[order].mean(1)), stds, rtol=0.25)


def test_virtual_negatives_never_come_from_the_anchor_component():
    gmm = StreamingGMM(8, 16, seed=2)
    gmm.initialise_from(uniform_sphere(64, 16, torch.Generator().manual_seed(1)))
    anchors = uniform_sphere(32, 16, torch.Generator().manual_seed(2))
    negatives, comps, anchor_c = gmm.virtual_negatives(anchors, 256, tau=0.1)
    assert negatives.shape == (32, 256, 16) and comps.shape == (32, 256)
    assert (comps != anchor_c[:, None]).all()
    assert len(torch.unique(comps)) > 1
    torch.testing.assert_close(negatives.norm(dim=-1), torch.ones(32, 256))
    u = gmm.uncertainty(anchors)
    assert ((u >= -1e-6) & (u <= math.log(8) + 1e-6)).all()


def test_mixture_state_round_trips_through_arrays():
    gmm = StreamingGMM(4, 8, seed=0)
    gmm.update(uniform_sphere(16, 8))
    copy = StreamingGMM(4, 8, seed=5)
    copy.load_state(gmm.state())
    torch.testing.assert_close(copy.means, gmm.means)
    assert float(copy.seen) == 16


# -- losses ----------------------------------------------------------------------------------------------


def test_info_nce_known_values():
    e = torch.eye(4)
    a = e[:1].repeat(3, 1)
    negatives = e[1:2].expand(3, 5, 4)
    expected = -math.log(math.exp(10) / (math.exp(10) + 5))
    assert abs(float(info_nce(a, a, negatives, tau=0.1)) - expected) < 1e-5
    in_batch = -math.log(math.exp(10) / (math.exp(10) + 3))
    assert abs(float(info_nce(e, e, None, tau=0.1)) - in_batch) < 1e-5


def test_sliced_wasserstein_known_values():
    reference = uniform_sphere(50, 3, torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -0.1, 0.2])
    directions = torch.eye(3)
    assert float(sliced_wasserstein_to_uniform(reference, reference=reference, directions=directions)) == 0.0
    value = sliced_wasserstein_to_uniform(reference + shift, reference=reference, directions=directions)
    assert abs(float(value) - float(shift.square().mean())) < 1e-6
    collapsed = torch.nn.functional.normalize(torch.ones(256, 8), dim=1)
    spread = uniform_sphere(256, 8, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    assert float(sliced_wasserstein_to_uniform(collapsed, generator=g)) > 10 * float(
        sliced_wasserstein_to_uniform(spread, generator=torch.Generator().manual_seed(3))
    )


def test_temporal_laplacian_known_value():
    v = torch.tensor([1.0, 2.0])
    z = torch.arange(5.0)[:, None] * v
    # k = 2: four edges at distance 1 (|v|² each), three at distance 2 (4|v|² each)
    assert abs(float(temporal_laplacian(z, neighbours=2)) - (4 + 12) / 7 * 5.0) < 1e-5


@pytest.mark.parametrize("term", ["task", "sw", "laplacian"])
def test_each_loss_term_reaches_the_device_blocks(term):
    encoder = SplitEncoder(**TINY, seed=0)
    channel = CodecChannel(make_codec("qsgd", seed=0))
    x = _logmel(6)
    k = 2
    z = encoder.server_forward(channel(encoder.device_forward(torch.cat([x, x + 0.01]), k), k), k)
    anchor, positive = z[:6], z[6:]
    weights = HybridWeights(task=float(term == "task"), sw=float(term == "sw"), laplacian=float(term == "laplacian"))
    negatives = uniform_sphere(6 * 4, 16).reshape(6, 4, 16)
    loss, values = hybrid_loss(anchor, positive, negatives, torch.zeros(0, 16), weights, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert values[term] > 0
    for name in encoder.device_parameter_names(k):
        grad = dict(encoder.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
    assert encoder.blocks[0].conv1.weight.grad.abs().sum() > 0


# -- costs, splitter, stream training --------------------------------------------------------------------


def _toy_costs() -> CostModel:
    # L = 4; a bulky input (k=0), a mid split that is cheap to send, an embedding that costs full compute
    return CostModel(
        part_ms=(1.0, 2.0, 2.0, 2.0, 2.0, 0.1), part_flops=(2e6, 4e6, 4e6, 4e6, 4e6, 1e4),
        bytes_by_k=(20000, 6000, 1500, 2500, 100), fidelity_by_k=(0.99, 0.99, 0.99, 0.98, 0.97), joule_per_byte=5e-7,
    )


def test_ppo_policy_beats_random_in_the_simulator():
    sim = SplitSimulator(_toy_costs(), RewardWeights(), log_c=math.log(64), seed=0)
    net = train_ppo(sim, iterations=25, seed=0)
    ppo = sim.evaluate(net.greedy)["reward"]
    rnd = sim.evaluate(random_policy(sim.actions, seed=0))["reward"]
    worst_static = min(sim.evaluate(static_policy(k))["reward"] for k in range(sim.actions))
    assert ppo > rnd + 0.1 and ppo > worst_static
    # it adapts: a loaded CPU on a fast link sends work to the server, an idle CPU on a slow link keeps it
    loaded_fast, idle_slow = states(np.array([2.0, 2.0]), math.log(64), np.array([0.9, 0.1]), np.array([8.0, 0.5]))
    assert net.greedy(loaded_fast[None])[0] < net.greedy(idle_slow[None])[0]


def test_an_uplink_price_costs_bytes_and_moves_the_oracle_to_the_smallest_payload():
    costs, log_c = _toy_costs(), math.log(64)
    free = SplitSimulator(costs, RewardWeights(), log_c)
    priced = SplitSimulator(costs, RewardWeights(zeta=2.0, b_budget_bytes=1000.0), log_c)
    k, load, mbps = np.arange(5), np.full(5, 0.3), np.full(5, 2.0)
    np.testing.assert_allclose(free.reward(k, load, mbps) - priced.reward(k, load, mbps),
                               2.0 * np.array(costs.bytes_by_k) / 1000.0)
    s = states(np.full(4, 2.0), log_c, np.array([0.1, 0.5, 0.9, 0.3]), np.array([8.0, 8.0, 8.0, 0.5]))
    sent_free, sent_priced = (np.array(costs.bytes_by_k)[oracle_policy(sim)(s)] for sim in (free, priced))
    assert (sent_priced <= sent_free).all() and sent_priced.sum() < sent_free.sum()
    assert (oracle_policy(priced)(s)[[0, 1, 3]] == 4).all()  # the 100-byte embedding unless the CPU is loaded


def test_costs_follow_load_and_bandwidth():
    costs = _toy_costs()
    assert costs.latency_ms(4, 0.9, 8.0) > costs.latency_ms(4, 0.1, 8.0)
    assert costs.latency_ms(0, 0.1, 0.5) > costs.latency_ms(0, 0.1, 8.0)
    assert costs.energy_mj(0) == pytest.approx(20000 * 5e-7 * 1000)
    load, mbps = client_conditions(0, 3, 50)
    assert load.shape == (50,) and ((0 <= load) & (load <= 0.95)).all() and (mbps > 0).all()


def test_train_on_stream_learns_counts_and_updates_the_mixture():
    encoder = SplitEncoder(**TINY, seed=0)
    gmm = StreamingGMM(8, 16, seed=0)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    channel = CodecChannel(make_codec("qsgd", seed=0))
    load, mbps = client_conditions(0, 0, 4)
    stats = train_on_stream(
        encoder, gmm, _logmel(32), channel, random_policy(5, seed=1), _toy_costs(), load, mbps,
        StreamTraining(batch=8, virtual_negatives=16, cold_start=8), seed=0,
    )
    assert stats.windows == 32 and sum(stats.split_hist(4)) == 32
    assert channel.traffic.up > 0 and channel.traffic.down > 0
    assert float(gmm.seen) == 32 and np.isfinite(stats.loss)
    assert any(not torch.equal(before[n], p) for n, p in encoder.named_parameters() if n.startswith("stem."))


def test_server_centric_sends_each_window_once_and_split_points_send_both_views():
    x = _logmel(8)
    sent_windows = {}
    for k in (0, 2):
        channel = CodecChannel(make_codec("fp16"))
        trainer = SplitTrainer(SplitEncoder(**TINY, seed=0), StreamingGMM(8, 16, seed=0), channel,
                               StreamTraining(batch=8, negatives="in-batch"), seed=0)
        trainer.step(x, k)
        sent_windows[k] = channel.traffic.windows
        if k == 0:  # the input, once: the server augments what it received
            assert channel.traffic.up == sum(len(make_codec("fp16").encode(w.numpy())) for w in x)
            assert channel.traffic.down == 0
    assert sent_windows == {0: 8, 2: 16}


def test_the_mixture_is_seeded_from_recent_anchors_before_its_negatives_are_used():
    gmm = StreamingGMM(8, 16, seed=0)
    trainer = SplitTrainer(SplitEncoder(**TINY, seed=0), gmm, CodecChannel(make_codec("fp32")),
                           StreamTraining(batch=4, cold_start=2, virtual_negatives=16), seed=0)
    assert trainer.seed_after == 8  # max(cold_start, C)
    random_means = gmm.means.clone()
    trainer.step(_logmel(4), 2)  # 4 windows seen: not yet seeded
    assert float(gmm.seen) == 4
    assert float(torch.cdist(gmm.means, trainer.history).min(dim=1).values.max()) > 1e-2
    trainer.step(_logmel(4), 2)  # 8 windows seen: seeded from the 8 anchors kept in the history
    history = trainer.history
    assert len(history) == 8 and not torch.allclose(gmm.means, random_means)
    distance = torch.cdist(gmm.means, history).min(dim=1).values
    assert float(distance.max()) < 1e-4  # every mean sits on one of the anchors
