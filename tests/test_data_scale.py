"""What keeps `prefalign data ...` small on big files: the compact key table behind dedup (it answers as
a dict would, in a fraction of the memory) and a start-up that imports no model library."""

import json
import random
import subprocess
import sys
import tracemalloc

from prefalign.data.curate import DuplicateTracker
from prefalign.data.hashtable import U64Table
from prefalign.data.records import Location, PreferencePair


def test_answers_as_a_dict_does_through_growth_collisions_and_wraparound():
    rng = random.Random(0)
    table, ref = U64Table(capacity=8), {}
    # keys crowded onto the last slots of every table size (wrap-around), plus random and repeated keys
    crowded = [(rng.getrandbits(40) << 24) | 0xFFFFFF for _ in range(300)]
    for i in range(20_000):
        kind = i % 4
        key = (rng.choice(crowded) if kind == 0 else rng.choice(list(ref) or [7]) if kind == 1
               else rng.getrandbits(64))
        value = rng.getrandbits(31)
        assert table.setdefault(key, value) == ref.get(key)
        ref.setdefault(key, value)
        assert table.get(key) == ref[key]  # a lookup probes the way the insert did
    assert len(table) == len(ref)
    assert all(table.get(k) == v and k in table for k, v in ref.items())
    assert table.get(12345) is None and 12345 not in table


def test_key_zero_and_values_past_32_bits():
    table = U64Table()
    assert table.setdefault(0, 5) is None and table.get(0) == 5 and 0 in table
    table.setdefault(99, 2**40 + 3)  # a line number past 2**31: the values widen to 8 bytes
    assert table.get(99) == 2**40 + 3 and table.get(0) == 5


def test_dedup_memory_per_record_is_a_fraction_of_a_dicts():
    """30k records through the duplicate tracker: the table's arrays, not ~120 bytes of dict entry
    and int objects per record (a dict here measured 110+ bytes a record)."""
    pairs = [PreferencePair(prompt=f"p{i}", chosen="a", rejected="b", where=Location("f", i)) for i in range(30_000)]
    tracker = DuplicateTracker()
    tracemalloc.start()
    for pair in pairs:
        assert tracker.check(pair)[0] == "new"
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current / len(pairs) < 40 and peak / len(pairs) < 60, (current, peak)
    assert tracker.check(pairs[5])[:2] == ("duplicate", 5)


def test_data_commands_import_no_model_library(tmp_path):
    """transformers costs a data command ~40 MB of RSS and a second or two of start-up; torch more."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    code = ("import runpy, sys; sys.argv = ['prefalign', 'data', 'stats', sys.argv[1], '--json']\n"
            "try: runpy.run_module('prefalign', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print(sorted({'torch', 'transformers', 'huggingface_hub'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    stats, heavy = proc.stdout.strip().splitlines()
    assert json.loads(stats)["pairs"] == 1 and heavy == "[]", proc.stdout
