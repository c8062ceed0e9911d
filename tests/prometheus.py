"""A real Prometheus (Debian's `prometheus`) scraping a run's Ray metrics endpoint, and its HTTP API."""
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from weightsync.torch_dist import free_port
from tests.conftest import ROOT


class Prometheus:
    """Scrapes 127.0.0.1:`target_port` every second with deploy/prometheus/prometheus.yml's relabelling."""

    def __init__(self, workdir: Path, target_port: int):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (scripts/system-packages.sh installs Debian's prometheus)"
        shipped = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        job = shipped["scrape_configs"][0]
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                                      "metric_relabel_configs": job["metric_relabel_configs"]}]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={workdir / 'data'}",
                                      f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    (workdir / "prometheus.log").read_text()[-3000:]
                time.sleep(0.5)

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{params}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
