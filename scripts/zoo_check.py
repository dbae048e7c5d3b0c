"""Check every torchvision classification model in the engine and write the table (docs/engine.md, "The
torchvision zoo"): float at 0% and 90% w8/a8 against PyTorch, or skipped with the op or size that stopped it.

    python scripts/zoo_check.py [--max-params 30000000] [--names resnet18,swin_t] [--json] [--out FILE]

One thread (the check measures agreement, not speed); progress, one line per model, goes to stderr.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import torch  # noqa: E402

from jpq_core.engine.zoo import MAX_PARAMS, SPARSITY, check_model, markdown_table  # noqa: E402
from jpq_core.models import torchvision_models  # noqa: E402
from jpq_core.tasks import ClassificationTask  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-params", type=int, default=MAX_PARAMS, help="models with more parameters are skipped, not built")
    p.add_argument("--names", help="comma-separated model names (default: the whole classification zoo)")
    p.add_argument("--sparsity", type=float, default=SPARSITY)
    p.add_argument("--json", action="store_true", help="the records as JSON instead of a markdown table")
    p.add_argument("--out", help="write there instead of stdout")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    names = args.names.split(",") if args.names else [n.removeprefix("tv:") for n in torchvision_models()]
    task = ClassificationTask("digits", batch_size=16)
    records = []
    for i, name in enumerate(names, 1):
        record = check_model(name, task, args.max_params, args.sparsity)
        records.append(record)
        print(f"[{i}/{len(names)}] {name}: {record.outcome} {record.reason} ({record.seconds:.1f} s)", file=sys.stderr, flush=True)
    if args.json:
        text = json.dumps([r.as_dict() for r in records], indent=1) + "\n"
    else:
        text = f"Run on {datetime.date.today()}, {args.sparsity:.0%} w8/a8, parameter budget {args.max_params:,}.\n\n" \
               + markdown_table(records)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
