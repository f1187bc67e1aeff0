"""Write tests/golden/runs.json: what each case of test_golden_runs.py trains to with the
code of the commit this is run at (the weights' and optimizer state's bytes, the checkpoint
meta but for the version, the metrics records but for their wall-clock seconds).

Made once, before the package was reorganised into layers (issue 19), so that
tests/test_golden_runs.py holds every later commit to the bytes that code trained to.
Run it again only when a change is meant to change what training computes, and say so in
the commit: `python tests/golden/make.py`.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_golden_runs import CASES, HERE, environment, train_case  # noqa: E402

if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {name: train_case(name, Path(tmp)) for name in CASES}
    out = {"made_with": environment(), "cases": results}
    (HERE / "runs.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HERE / 'runs.json'}: {len(results)} cases")
