"""Rebuild a convergence report from saved study results, without training anything.

    python -m pipelines.report STUDY_DIR                         # rewrite STUDY_DIR/report.html and its PNGs
    python -m pipelines.report BEFORE_DIR AFTER_DIR              # overlay: ./report-<id1>-vs-<id2>/report.html
    python -m pipelines.report STUDY_DIR [STUDY_DIR ...] [--out DIR] [--title TEXT]

A study directory is what `python -m pipelines.submit pipeline=study` left behind: study.json
plus runs/<name>/metrics.jsonl. Two or more studies (e.g. before/after a model change) are
overlaid in one report, one colour and marker per study. Prints the path of report.html.
"""

import argparse
import re
import sys
from pathlib import Path

from components import storage
from components.errors import UserInputError
from components.report import load_study, render
from components.report_plots import study_id


def default_out(study_dirs: list, studies: list) -> Path:
    """One study: its own directory. Several: report-<id1>-vs-<id2> in the current directory,
    so that an overlay never overwrites any one study's report."""
    if len(studies) == 1:
        return Path(study_dirs[0])
    ids = [re.sub(r"[^\w.-]+", "_", study_id(s, i)) for i, s in enumerate(studies)]  # ids become a file name
    return Path.cwd() / ("report-" + "-vs-".join(ids))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dirs", nargs="+", help="study directories (two or more: overlay)")
    parser.add_argument("--out", help="output directory for report.html and the PNGs "
                                      "(default: the study directory; ./report-<id1>-vs-<id2> for an overlay)")
    parser.add_argument("--title", help="page title (default: from the study ids)")
    args = parser.parse_args(argv)

    try:
        studies = [load_study(d) for d in args.study_dirs]
        out = storage.local_path(args.out) if args.out else default_out(args.study_dirs, studies)
        path = render(studies, out, args.title)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
