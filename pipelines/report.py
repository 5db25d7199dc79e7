"""Rebuild a convergence report from saved study results, without training anything.

    python -m pipelines.report STUDY                             # rewrite STUDY's report.html and its PNGs
    python -m pipelines.report s3://bucket/runs/<study> --endpoint-url http://minio:9000
    python -m pipelines.report BEFORE AFTER                      # overlay: ./report-<id1>-vs-<id2>/report.html
    python -m pipelines.report STUDY [STUDY ...] [--out DIR] [--title TEXT]

A study is what `python -m pipelines.submit pipeline=study` published to <output_dir>/<study id>/,
a local directory or s3://: study.json plus runs/<name>/metrics.jsonl, read through the study's
manifest (each file verified) into a temporary directory. One study's report goes back where the
study is (sealed again, so its manifest lists the new files) unless --out says otherwise; two or
more studies (e.g. before/after a model change) are overlaid in one report, one colour and marker
per study. Prints where report.html went. Credentials for s3:// come from the AWS environment.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

from components import storage
from components.config import StorageConfig
from components.errors import UserInputError
from components.report import fetch_study, load_study, render
from components.report_plots import study_id
from components.run_store import RunStore, join_uri, local_files
from pipelines.outputs import published_extra


def default_out(studies: list) -> Path:
    """Several studies: report-<id1>-vs-<id2> in the current directory, so that an overlay never
    overwrites any one study's report."""
    ids = [re.sub(r"[^\w.-]+", "_", study_id(s, i)) for i, s in enumerate(studies)]  # ids become a file name
    return Path.cwd() / ("report-" + "-vs-".join(ids))


def rebuild(stores: list, out, title) -> str:
    with tempfile.TemporaryDirectory(prefix="report-") as work:
        studies = []
        for i, store in enumerate(stores):
            study = load_study(fetch_study(store, Path(work) / str(i)))
            study["study_dir"] = store.uri
            studies.append(study)
        if out is not None or len(stores) > 1:
            return str(render(studies, out or default_out(studies), title))
        drawn = render(studies, Path(work) / "out", title)  # one study: back into its own store
        store = stores[0]
        for key in local_files(drawn.parent):
            store.put_file(drawn.parent / key, key)
        store.seal(published_extra(store.read_manifest()))
        return join_uri(store.uri, drawn.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="study locations, local or s3:// (two or more: overlay)")
    parser.add_argument("--out", help="local directory for report.html and the PNGs "
                                      "(default: the study itself; ./report-<id1>-vs-<id2> for an overlay)")
    parser.add_argument("--title", help="page title (default: from the study ids)")
    parser.add_argument("--endpoint-url", help="S3 endpoint for s3:// studies (MinIO, moto); default: AWS")
    parser.add_argument("--region", help="S3 region; default: the AWS environment's")
    args = parser.parse_args(argv)

    try:
        settings = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
        stores = [RunStore.open(s.rstrip("/"), settings) for s in args.studies]
        out = storage.local_path(args.out, "--out") if args.out else None
        print(rebuild(stores, out, args.title))
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
