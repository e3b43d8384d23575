"""Optional: the task-vector family's registry entries read as mergekit 0.1.5's.

mergekit registers ties, dare, breadcrumbs and della as one generalized task-arithmetic method with
data (a sparsification method, a consensus method, default ``normalize`` and ``rescale``). Each of
its entries, read from mergekit's own registry by its Python (found by ``_mergekit.py``), must be
the same data in evomerge's registry: the sparsifier, sign consensus on or off, and every
parameter with its scope and default.
"""

from __future__ import annotations

import json
import subprocess

from _mergekit import find

from evomerge.methods import METHODS, REQUIRED, Sparsifier

MK_PY = find("python")
pytestmark = MK_PY.marks
_mergekit_present = MK_PY.present

_DUMP = """
import json
from mergekit.merge_methods import registry
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

def default(p):
    return p.default if isinstance(p.default, (bool, int, float, type(None))) else "REQUIRED"

print(json.dumps({
    m.method_name: {
        "sparsifier": m.sparsification_method and m.sparsification_method.name,
        "consensus": m.consensus_method and m.consensus_method.name,
        "params": {p.name: [p.scope.name.lower(), default(p)] for p in m.spec.parameters},
    }
    for m in registry.registered_methods()
    if isinstance(m, GeneralizedTaskArithmeticMerge)
}))
"""
# mergekit's SparsificationMethod names for evomerge's sparsifiers.
_SPARSIFIERS = {
    "magnitude": Sparsifier.MAGNITUDE,
    "random": Sparsifier.RANDOM,
    "magnitude_outliers": Sparsifier.MAGNITUDE_OUTLIERS,
    "della_magprune": Sparsifier.DELLA,
}


def test_task_vector_entries_are_mergekits() -> None:
    proc = subprocess.run(
        [str(MK_PY.path), "-c", _DUMP], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout)
    assert len(theirs) == 8, sorted(theirs)
    ours = {name for name, m in METHODS.items() if m.sparsifier is not None}
    assert ours == {name for name, e in theirs.items() if e["sparsifier"]}
    for name, entry in theirs.items():
        m = METHODS[name]
        sparsifier = entry["sparsifier"] and _SPARSIFIERS[entry["sparsifier"]]
        assert (m.sparsifier, m.consensus) == (sparsifier, entry["consensus"] == "sum"), name
        params = {
            p.name: [p.scope, "REQUIRED" if p.default is REQUIRED else p.default] for p in m.params
        }
        assert params == entry["params"], name
