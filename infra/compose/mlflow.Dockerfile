# MLflow tracking server with the Postgres driver and boto3 (the upstream image has neither).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3>=1.34"
EXPOSE 5000
