#!/bin/bash
# Postgres entrypoint hook: create the MLflow role + database beside Prefect's (POSTGRES_DB).
set -euo pipefail
psql -v ON_ERROR_STOP=1 -v mlflow_password="$MLFLOW_DB_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f /docker-entrypoint-initdb.d/initdb.sql.in
