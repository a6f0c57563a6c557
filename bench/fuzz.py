"""The long fuzz run: `tests/fuzzing.py` (the library `tests/test_fuzz.py` runs CI-sized) from the command line.

    nice -n 10 python bench/fuzz.py --minutes 15 --out /tmp/leank-fuzz      # a long run; prints a summary
    nice -n 10 python bench/fuzz.py --minutes 1 --target tokenizer          # one target only
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzzing import main  # noqa: E402

if __name__ == "__main__":
    main()
