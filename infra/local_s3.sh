#!/usr/bin/env bash
# A local S3-compatible server for development: moto's server mode, the same
# server the tests in tests/test_object_store.py talk to.
#
#   infra/local_s3.sh                 # http://127.0.0.1:9000, bucket shoal-dev
#   PORT=9100 BUCKET=mine infra/local_s3.sh
#
# Stays in the foreground; Ctrl-C stops it. State lives in memory only: the
# bucket and every checkpoint in it are gone when the server stops.
# Needs moto[server] and boto3 (pip install -e '.[test]').
set -euo pipefail

HOST=127.0.0.1            # loopback only: moto checks no credentials
PORT="${PORT:-9000}"
BUCKET="${BUCKET:-shoal-dev}"
PYTHON="${PYTHON:-python3}"
ENDPOINT="http://${HOST}:${PORT}"

if ! "$PYTHON" -c 'import moto.server, boto3' 2>/dev/null; then
    echo "error: $PYTHON cannot import moto.server and boto3; run: pip install -e '.[test]'" \
         "(or set PYTHON=/path/to/venv/bin/python)" >&2
    exit 1
fi

# Refuse a taken port up front: otherwise the bucket would be created on
# whatever already listens there and this script would look like it worked.
if ! "$PYTHON" -c 'import socket, sys; socket.create_server((sys.argv[1], int(sys.argv[2]))).close()' \
        "$HOST" "$PORT" 2>/dev/null; then
    echo "error: ${HOST}:${PORT} is in use (another local_s3.sh?); pick a free one with PORT=" >&2
    exit 1
fi

"$PYTHON" -m moto.server -H "$HOST" -p "$PORT" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

# Create the bucket once the server answers; give up after ~15 s, or at once if
# the server died.
"$PYTHON" - "$ENDPOINT" "$BUCKET" "$server_pid" <<'PY'
import os, sys, time
import boto3
from botocore.config import Config

endpoint, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="testing", aws_secret_access_key="testing",
    config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                  connect_timeout=1, read_timeout=5),
)
deadline = time.monotonic() + 15
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("error: the S3 server exited before answering; see its output above")
    try:
        s3.create_bucket(Bucket=bucket)
        break
    except s3.exceptions.BucketAlreadyOwnedByYou:
        break
    except Exception as e:  # not listening yet
        if time.monotonic() > deadline:
            sys.exit(f"error: no S3 server answering at {endpoint} after 15 s: {e}")
        time.sleep(0.2)
PY

cat <<MSG

Local S3 is up at ${ENDPOINT} with bucket '${BUCKET}' (in memory; Ctrl-C stops it).
In the shell that runs shoal:

  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1

and add these overrides to 'shoal run':

  checkpoint.uri=s3://${BUCKET}/runs storage.endpoint_url=${ENDPOINT} storage.path_style=true storage.region=us-east-1

MSG

wait "$server_pid"
