"""Random prototxt graphs and damaged checkpoint folders for the fuzzing campaigns
(tests/test_fuzz.py, experiments/fuzz_long.py), each with what Caffe would do, computed
here independently of the library: which layers the NetState keeps, whether a blob has two
producers, which unknown field must be named."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("deploy", "train", "x")
ONE_BOTTOM = ("ReLU", "TanH", "Sigmoid", "AbsVal", "Dropout", "Power")


@dataclass
class Graph:
    text: str
    stages: tuple[str, ...]
    level: int | None
    kept: list[str]                # layer names Caffe's FilterNet keeps, in order
    duplicate: str | None          # a top produced twice among the kept layers
    unknown_field: str | None      # an unknown field inside a known message
    too_many_layers: bool
    rules: list[str] = field(default_factory=list)


def _rule(rng: random.Random) -> tuple[str, dict]:
    r: dict = {}
    k = rng.randrange(4)
    if k == 0:
        r["stage"] = rng.sample(STAGES, rng.randint(1, 2))
    elif k == 1:
        r["not_stage"] = [rng.choice(STAGES)]
    elif k == 2:
        r["min_level"] = rng.randint(0, 2)
    else:
        r["max_level"] = rng.randint(0, 2)
    parts = [f'stage: "{s}"' for s in r.get("stage", ())]
    parts += [f'not_stage: "{s}"' for s in r.get("not_stage", ())]
    parts += [f"{k}: {v}" for k, v in r.items() if k in ("min_level", "max_level")]
    return " ".join(parts), r


def _meets(r: dict, stages: set, level: int) -> bool:
    """Caffe's StateMeetsRule (net.cpp), phase aside (every rule here is phase-free)."""
    if "min_level" in r and level < r["min_level"]:
        return False
    if "max_level" in r and level > r["max_level"]:
        return False
    if any(s not in stages for s in r.get("stage", ())):
        return False
    return not any(s in stages for s in r.get("not_stage", ()))


def random_graph(rng: random.Random, max_layers: int = 2048) -> Graph:
    """A net on a (1, 4, 3, 3) input: layers of many bottoms and tops, in-place layers,
    duplicate tops, include/exclude rules, a net ``state``, unknown fields."""
    net_stages = rng.sample(STAGES, rng.randint(0, 2))
    call_stages = tuple(rng.sample(STAGES, rng.randint(0, 1)))
    level = rng.choice([None, 0, 1, 2])
    net_level = rng.choice([0, 0, 1])
    state = " ".join(f'stage: "{s}"' for s in net_stages)
    state += f" level: {net_level}" if net_level else ""
    lines = [f"state {{ {state} }}",
             'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
             'dim: 4 dim: 3 dim: 3 } } }']
    eff_stages = set(net_stages) | set(call_stages)
    eff_level = net_level if level is None else level
    kept = ["data"]
    produced_kept = {"data"}
    duplicate = None
    blobs = ["data"]
    unknown = None
    n = rng.randint(1, 14)
    long_chain = rng.random() < 0.06
    if long_chain:
        n = rng.choice([rng.randint(50, 200), max_layers + 1])
    for i in range(n):
        name = f"l{i}"
        kind = "TanH" if long_chain else rng.choice(
            ONE_BOTTOM + ("Eltwise", "Eltwise", "Concat", "Split", "Slice", "Silence"))
        extra = ""
        if kind in ONE_BOTTOM:
            bottoms = [rng.choice(blobs)]
            k_tops = 1
        elif kind == "Eltwise":
            bottoms = [rng.choice(blobs) for _ in range(rng.choice([2, 3, 17, 40]))]
            k_tops = 1
            extra = f" eltwise_param {{ operation: {rng.choice(['SUM', 'PROD', 'MAX'])} }}"
        elif kind == "Concat":
            bottoms = [rng.choice(blobs) for _ in range(rng.randint(1, 5))]
            k_tops = 1
        elif kind == "Slice":
            bottoms = [rng.choice(blobs)]
            k_tops = rng.choice([1, 2, 4])
        elif kind == "Split":
            bottoms = [rng.choice(blobs)]
            k_tops = rng.randint(1, 5)
        else:
            bottoms = [rng.choice(blobs) for _ in range(rng.randint(1, 3))]
            k_tops = 0
        tops = []
        for j in range(k_tops):
            c = rng.random()
            if long_chain or (c < 0.3 and j < len(bottoms)):
                tops.append(bottoms[j])                 # in place
            elif c < 0.4:
                tops.append(rng.choice(blobs))          # maybe a second producer
            else:
                tops.append(f"b{i}_{j}")
        rule_text = ""
        rule = None
        if not long_chain and rng.random() < 0.35:
            body, rule = _rule(rng)
            which = rng.choice(["include", "exclude"])
            rule_text = f" {which} {{ {body} }}"
            rule = (which, rule)
        if not long_chain and unknown is None and rng.random() < 0.08:
            unknown = rng.choice(["bogus_field", "strde", "ceil_mode"])
            if kind == "ReLU":
                extra += f" relu_param {{ negative_slope: 0 {unknown}: 1 }}"
            elif kind == "Dropout":
                extra += f" dropout_param {{ dropout_ratio: 0.5 {unknown}: 2 }}"
            else:
                extra += f" {unknown}: 3"
        if not long_chain and rng.random() < 0.1:
            extra += " fork_param { a: 1 nested { b: 2 anything: \"x\" } }"  # skipped whole
        b = "".join(f' bottom: "{x}"' for x in bottoms)
        t = "".join(f' top: "{x}"' for x in tops)
        lines.append(f'layer {{ name: "{name}" type: "{kind}"{b}{t}{extra}{rule_text} }}')
        keep = True
        if rule is not None:
            meets = _meets(rule[1], eff_stages, eff_level)
            keep = meets if rule[0] == "include" else not meets
        if keep:
            kept.append(name)
            for j, top in enumerate(tops):
                in_place = j < len(bottoms) and bottoms[j] == top
                if top in produced_kept and not in_place and duplicate is None:
                    duplicate = top
                produced_kept.add(top)
        blobs.extend(x for x in tops if x not in blobs)
    return Graph(text="\n".join(lines) + "\n", stages=call_stages, level=level, kept=kept,
                 duplicate=duplicate, unknown_field=unknown,
                 too_many_layers=len(kept) > max_layers)


def damage_checkpoint(src: Path, dst: Path, rng: random.Random) -> str:
    """A copy of the checkpoint folder ``src`` at ``dst`` with one file damaged: truncated,
    a bit flipped, emptied, deleted, or replaced by bad or 100,000-deep JSON."""
    shutil.copytree(src, dst)
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    target = rng.choice(files)
    raw = target.read_bytes()
    how = rng.choice(["truncate", "flip", "flip", "empty", "delete", "json", "deep"])
    if how == "truncate":
        target.write_bytes(raw[:rng.randrange(max(len(raw), 1))])
    elif how == "flip" and raw:
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(b))
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "delete":
        target.unlink()
    elif how == "json":
        target.write_bytes(rng.choice([b"[]", b"null", b'{"a": 1}', b'{"train_loss": "x"}',
                                       b"{", b'"s"']))
    else:
        target.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    return f"{how} {target.relative_to(dst)}"
