"""A quick look at the tracking server, for entry points where someone waits: MLflow itself retries each
request for minutes before it says that nothing answers. No MLflow import here: a refusal comes before
the heavy libraries load."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from omegaconf import DictConfig

from workbench.config import ConfigError, redact


def check_server(tracking_cfg: DictConfig) -> None:
    """Refuse an http(s) tracking URI where no MLflow server answers, at once. For a fresh process (no
    `mlflow.set_tracking_uri` yet), the URI MLflow would use: tracking.uri, else MLFLOW_TRACKING_URI. A
    study's workers do not call this: they ride out a server restart on MLflow's retries."""
    uri = str(tracking_cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # something answered: MLflow's own requests say what is wrong
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.uri={redact(uri)}: no MLflow server answers there ({reason})") from None
