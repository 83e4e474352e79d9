"""Read a run's TensorBoard directory with TensorBoard's own loader and print its scalars.

Usage: .venv/bin/python scripts/check_tensorboard.py RUN_DIR/tensorboard [TAG]

Fails when TensorBoard finds no scalars, or (with TAG) none under that tag.
"""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(logdir, tag=None):
    acc = EventAccumulator(logdir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if not tags or (tag and tag not in tags):
        sys.exit(f"no scalars{' under ' + tag if tag else ''} in {logdir} (tags: {tags})")
    for t in [tag] if tag else tags:
        for e in acc.Scalars(t):
            print(f"{t}\t{e.step}\t{e.value:.6g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
