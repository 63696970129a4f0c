"""Fuzzing the adapter-file reader: 1,200 seeded mutations of a valid kohya file (header bytes, the length field,
tensor offsets, dtypes, shapes, key names, metadata, truncation, data bytes). Each one either loads or raises
SdloraError (one line for the user); none raises anything else, hangs, or allocates more than the file could hold.
"""

from __future__ import annotations

import json
import random
import resource
import time

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter
from sdlora.tools.inspect import inspect_adapter

N_MUTATIONS = 1200
DTYPES = ["F16", "F32", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX", "", 7]
NAMES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_proj_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(0)
    modules = {
        NAMES[0]: ModuleWeights(torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g), 2.0),
        NAMES[1]: ModuleWeights(torch.randn(4, 16, 1, 1, generator=g), torch.randn(16, 4, 1, 1, generator=g), 4.0),
        NAMES[2]: ModuleWeights(torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g), 1.0),
    }
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_adapter(path, modules, {"ss_output_name": "fuzz", "ss_tag_frequency": json.dumps({"d": {"a": 1}})})
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def _mutate_entry(rng: random.Random, header: dict) -> None:
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    what = rng.randrange(9)
    if what == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif what == 1:
        entry["shape"] = [rng.choice([0, 1, 2, 3, 4, 16, 2**31, 2**40, -1]) for _ in range(rng.randrange(0, 5))]
    elif what == 2:
        i = rng.randrange(len(entry["shape"])) if entry["shape"] else None
        if i is not None:
            entry["shape"][i] = rng.choice([0, entry["shape"][i] * 2, entry["shape"][i] + 1, -3, 2**62])
    elif what == 3:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + rng.randrange(1, 10**6)], [-8, end],
                                            [start, 2**63], [0, 0], [start + 2, end + 2]])
    elif what == 4:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice([None, "x", {"a": 1}, [[1]], 3.5])
    elif what == 5:
        del entry[rng.choice(list(entry))]
    elif what == 6:  # rename the key: unknown suffix, peft layout, another module, nonsense
        new = rng.choice([key.replace("lora_down", "lora_middle"), key.replace(".lora_up.weight", ".lora_B.weight"),
                          "unet." + key, key.replace("alpha", "hada_w1_a"), key.replace("lora_unet", "lora_vae"),
                          "", "\u0000", key + ".extra", key.replace(".lora_down.weight", ".dora_scale")])
        header[new] = header.pop(key)
    elif what == 7:
        del header[key]
    else:
        header[key] = rng.choice([None, [], "tensor", 1])


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One seeded mutation of a valid file: of its bytes, of its parsed header, or both."""
    kind = rng.randrange(8)
    if kind == 0:  # random bytes of the header, length field included
        b = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(0, 8 + int.from_bytes(data[:8], "little"))] = rng.randrange(256)
        return bytes(b)
    if kind == 1:  # the length field alone
        n = int.from_bytes(data[:8], "little")
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) - 7, 2**63, 2**64 - 1, rng.randrange(2**64)])
        return new.to_bytes(8, "little") + data[8:]
    if kind == 2:  # truncation anywhere
        return data[: rng.randrange(0, len(data))]
    if kind == 3:  # tensor bytes changed (may become NaN/inf; must still load or be refused cleanly)
        b = bytearray(data)
        start = 8 + int.from_bytes(data[:8], "little")
        for _ in range(rng.randrange(1, 50)):
            b[rng.randrange(start, len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 4:  # bytes appended or removed at the end of the data
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) if rng.random() < 0.5 else data[:-2]
    header, body = _split(data)
    if kind == 5:
        for _ in range(rng.randrange(1, 4)):
            if len(header) > 1:
                try:
                    _mutate_entry(rng, header)
                except (TypeError, KeyError, IndexError, ValueError):
                    pass  # an earlier mutation left this entry in no shape for this one: the file is mutated anyway
    elif kind == 6:  # metadata of the wrong shape
        header["__metadata__"] = rng.choice([None, [], "text", {"k": 1}, {"ss_tag_frequency": "{not json"},
                                             {"lora_adapter_metadata": "{bad"}, {"a": {"nested": 1}}])
    else:  # valid-looking JSON that is not a safetensors header
        header = rng.choice([{}, {"__metadata__": {}}, {"x": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}])
    return _join(header, body)


def test_every_mutation_loads_or_is_one_error(valid, tmp_path):
    rng = random.Random(20261202)
    path = tmp_path / "m.safetensors"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = {"loaded": 0, "refused": 0}
    started = time.perf_counter()
    for i in range(N_MUTATIONS):
        data = mutate(rng, valid)
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            adapter = load_adapter(path)
            if i % 10 == 0:
                inspect_adapter(path)  # the report reads widths, hashes and stats of whatever loaded
            outcomes["loaded"] += 1
            assert adapter.modules or adapter.deltas
        except SdloraError as e:
            outcomes["refused"] += 1
            assert "\n" not in str(e) and str(e), f"mutation {i}: not one line: {e!r}"
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} raised {type(e).__name__}: {e}\nfirst bytes: {data[:120]!r}")
        assert time.perf_counter() - t0 < 2.0, f"mutation {i} took {time.perf_counter() - t0:.1f} s"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB for files of {len(valid)} bytes"
    assert outcomes["loaded"] > 50 and outcomes["refused"] > 500, outcomes  # both paths were exercised
    assert time.perf_counter() - started < 60
