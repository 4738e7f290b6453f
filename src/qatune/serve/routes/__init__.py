"""The service's routes, one APIRouter per concern; `serve.app` mounts them all."""
