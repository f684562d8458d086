-- Runs once, on an empty Postgres volume: one server, one database and role per service.
-- The passwords come from the compose environment (see infra/compose/.env.example).
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
