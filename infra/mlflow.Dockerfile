# MLflow tracking server with the PostgreSQL driver and S3 client the compose file's backends need.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1
RUN pip install mlflow==3.17.2 psycopg2-binary boto3
