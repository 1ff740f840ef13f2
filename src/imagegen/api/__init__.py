"""The gRPC face (and the HTTP side): servicers map proto to domain values, call one
use case of services/, and map the result back; interceptors carry identity, errors,
draining and tracing. Nothing here imports repositories, providers, storage or jobs."""
