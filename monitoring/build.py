"""Write monitoring/alerts.yaml, the PrometheusRule manifest, from monitoring/rules.yaml.

rules.yaml is the one source of the alerting rules (a plain Prometheus rules file that promtool
checks and tests); alerts.yaml carries the same groups, text for text, under `spec:` for the
Prometheus Operator. Run after editing rules.yaml:

    .venv/bin/python monitoring/build.py            # rewrite alerts.yaml
    .venv/bin/python monitoring/build.py --check    # exit 1 if alerts.yaml is out of date

Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
MANIFEST = HERE / "alerts.yaml"

HEADER = """\
# GENERATED from monitoring/rules.yaml by monitoring/build.py: edit rules.yaml, then run
#     .venv/bin/python monitoring/build.py
# The LoRA sidecar's alerting rules as a PrometheusRule (Prometheus Operator, kube-prometheus).
# Apply it in the namespace your Prometheus watches for rules, with the labels its ruleSelector
# asks for (kube-prometheus-stack: `release: <its release name>`):
#     kubectl apply -n monitoring -f monitoring/alerts.yaml
# What each alert means and what to do: README.md, section Monitoring.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: lora-sidecar
  labels:
    app.kubernetes.io/name: lora-sidecar
    app.kubernetes.io/component: alert-rules
spec:
"""


def render(rules_text: str) -> str:
    """The manifest: HEADER, then rules.yaml from its `groups:` line on, indented under spec."""
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError(f"{RULES}: no top-level `groups:` line")
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return HEADER + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if alerts.yaml differs from what would be written")
    args = parser.parse_args()
    text = render(RULES.read_text(encoding="utf-8"))
    if args.check:
        current = MANIFEST.read_text(encoding="utf-8") if MANIFEST.exists() else ""
        if current != text:
            print(f"{MANIFEST} is out of date: run .venv/bin/python monitoring/build.py", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(text, encoding="utf-8")
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
