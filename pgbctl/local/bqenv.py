"""The private virtual environment that runs the local warehouse (``bqemulator``).

bqemulator 1.4.0 needs DuckDB 1.5.x plus DuckDB's ``spatial`` extension (it refuses to start
without it) while the main venv carries DuckDB 2.x, so it lives in its own venv:
``<repo>/.venv-bqemulator`` (or ``$PGBCTL_BQEMULATOR_VENV``).  DuckDB normally downloads
extensions at run time; here they come from PyPI's ``duckdb-extension-*`` wheels and are
installed from the wheel's file into ``<venv>/duckdb-home/.duckdb/extensions`` (the server
runs with ``HOME=<venv>/duckdb-home``), so nothing is fetched at run time.

:func:`ensure_warehouse_env` is idempotent and safe to call concurrently (file lock); the
first call takes ~40-60 s (pip from the registry), later calls ~1 ms.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from pgbctl import paths
from pgbctl.local.procs import file_lock

BQEMULATOR_VERSION = "1.4.0"
DUCKDB_VERSION = "1.5.5"

REQUIREMENTS = [
    f"bqemulator=={BQEMULATOR_VERSION}",
    f"duckdb=={DUCKDB_VERSION}",
    f"duckdb-extension-spatial=={DUCKDB_VERSION}",
    f"duckdb-extension-avro=={DUCKDB_VERSION}",
    "numpy>=1.26,<3",  # bqemulator's builtin UDFs need it at start-up (not declared by the package)
]

# The full set that was verified to work together (2026-12).  Used as pip constraints so a
# later release of a transitive dependency cannot silently break the warehouse.
CONSTRAINTS = """
alembic==1.20.1
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
asgiref==3.13.0
bqemulator==1.4.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
cryptography==50.0.2
duckdb==1.5.5
duckdb-extension-avro==1.5.5
duckdb-extension-spatial==1.5.5
fastapi==0.165.0
fastavro==1.13.1
google-api-core==2.44.0
google-auth==2.63.0
google-cloud-bigquery-storage==2.43.0
googleapis-common-protos==1.76.0
grpcio==1.85.3
grpcio-health-checking==1.80.1
grpcio-status==1.85.3
grpcio-tools==1.80.1
h11==0.16.0
httpcore==1.0.9
httptools==0.9.0
httpx==0.29.0
idna==3.20
Mako==1.4.3
MarkupSafe==3.0.4
numpy==2.4.6
opentelemetry-api==1.45.2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-instrumentation==0.66b2
opentelemetry-instrumentation-asgi==0.66b2
opentelemetry-instrumentation-fastapi==0.66b2
opentelemetry-instrumentation-grpc==0.66b2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-util-http==0.66b2
orjson==3.13.0
packaging==26.4
prometheus_client==0.26.0
proto-plus==1.29.0
protobuf==6.33.6
pyarrow==26.0.1
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
PyJWT==2.15.1
python-dateutil==2.9.0.post0
python-dotenv==1.2.4
pytz==2026.6
PyYAML==6.0.4
requests==2.34.2
six==1.17.0
SQLAlchemy==2.1.9
sqlglot==30.11.0
starlette==1.10.0
structlog==26.1.0
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.55.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
wrapt==2.5.2
""".strip()

_EXTENSIONS = ("spatial", "avro")

_INSTALL_EXTENSIONS = r"""
import importlib, pathlib, duckdb
con = duckdb.connect()
for name in %r:
    mod = importlib.import_module("duckdb_extension_" + name)
    files = sorted(pathlib.Path(mod.__file__).parent.glob("extensions/*/%%s.duckdb_extension" %% name))
    if not files:
        raise SystemExit("no %%s.duckdb_extension file in its wheel" %% name)
    con.execute("FORCE INSTALL '%%s'" %% files[-1])
    con.execute("LOAD " + name)
print("ok")
""" % (_EXTENSIONS,)


class WarehouseEnvError(RuntimeError):
    pass


def warehouse_venv() -> Path:
    env = os.environ.get("PGBCTL_BQEMULATOR_VENV")
    return Path(env) if env else paths.REPO_ROOT / ".venv-bqemulator"


def warehouse_python(venv: Path | None = None) -> Path:
    return (venv or warehouse_venv()) / "bin" / "python"


def duckdb_home(venv: Path | None = None) -> Path:
    """HOME for the bqemulator process: DuckDB keeps its extensions under ``$HOME/.duckdb``."""
    return (venv or warehouse_venv()) / "duckdb-home"


def _fingerprint() -> str:
    blob = json.dumps({"req": REQUIREMENTS, "con": CONSTRAINTS, "ext": _EXTENSIONS, "v": 1})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _marker(venv: Path) -> Path:
    return venv / ".pgbctl-ready"


def warehouse_env_ready(venv: Path | None = None) -> bool:
    venv = venv or warehouse_venv()
    try:
        ok = json.loads(_marker(venv).read_text()).get("fingerprint") == _fingerprint()
    except (OSError, ValueError):
        return False
    return ok and warehouse_python(venv).exists()


def _run(argv: list[str], log, env: dict[str, str] | None = None) -> None:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise WarehouseEnvError(f"command failed ({rc}): {' '.join(argv)}")


def ensure_warehouse_env(venv: Path | None = None, *, log_path: Path | None = None) -> Path:
    """Create (once) the bqemulator venv; return its path.  Idempotent, concurrency-safe."""
    venv = venv or warehouse_venv()
    if warehouse_env_ready(venv):
        return venv
    venv.mkdir(parents=True, exist_ok=True)  # lock and log live inside (covered by .gitignore)
    with file_lock(venv / ".pgbctl-setup.lock", timeout=900):
        if warehouse_env_ready(venv):
            return venv
        log_path = log_path or (venv / ".pgbctl-setup.log")
        with open(log_path, "a") as log:
            try:
                if not warehouse_python(venv).exists():
                    base = getattr(sys, "_base_executable", None) or sys.executable
                    _run([base, "-m", "venv", str(venv)], log)
                py = str(warehouse_python(venv))
                cons = venv / "pgbctl-constraints.txt"
                cons.write_text(CONSTRAINTS + "\n")
                _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q",
                      "-c", str(cons), *REQUIREMENTS], log)
                home = duckdb_home(venv)
                home.mkdir(parents=True, exist_ok=True)
                _run([py, "-c", _INSTALL_EXTENSIONS], log, env={**os.environ, "HOME": str(home)})
            except (WarehouseEnvError, OSError) as e:
                raise WarehouseEnvError(
                    f"could not prepare the local warehouse environment in {venv}: {e}. "
                    f"It needs Python >= 3.11 with venv/pip and access to the package registry "
                    f"(packages: {', '.join(REQUIREMENTS)}). Log: {log_path}"
                ) from e
        _marker(venv).write_text(json.dumps({"fingerprint": _fingerprint(), "requirements": REQUIREMENTS}))
    return venv
