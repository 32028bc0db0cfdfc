#!/bin/sh
# MinIO's `minio server DIR [--console-address ...]`, served by SeaweedFS: master, volume server, filer
# and S3 gateway in one process; S3 on :9000 for the other containers, the rest on loopback.
set -e
if [ "$1" != minio ] && [ -n "$1" ]; then
	set -- minio "$@"
fi
if [ "$1" != minio ] || [ "$2" != server ]; then
	exec "$@"
fi
dir=${3:-/data}
mkdir -p "$dir/weed"
cat > /etc/s3.json <<JSON
{"identities": [{"name": "root", "credentials": [{"accessKey": "${MINIO_ROOT_USER:-minioadmin}",
 "secretKey": "${MINIO_ROOT_PASSWORD:-minioadmin}"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
exec weed server -dir="$dir/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.volumeSizeLimitMB=64 -volume.max=50 \
	-filer -s3 -s3.ip.bind=0.0.0.0 -s3.port=9000 -s3.port.iceberg=0 -s3.port.lance=0 -s3.config=/etc/s3.json
