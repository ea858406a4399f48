# The MLflow tracking server image (no torch, no Ray): docker build -f infra/k8s/mlflow.Dockerfile -t ccnet-mlflow:0.1.0 .
# Pins: ../../shared/STACK.md (mlflow 3.17.2 needs pyarrow < 26); psycopg2 for the Postgres backend store.
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 pyarrow==25.0.1 boto3==1.44.8 psycopg2-binary==2.9.13 \
    && useradd --uid 1000 --create-home mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT []
CMD ["mlflow", "server", "--help"]
