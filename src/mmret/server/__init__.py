"""A search server and web page over one index: ``mmret serve`` or :func:`create_app`.

Needs the ``serve`` extra (``pip install 'mmret[serve]'``): FastAPI, uvicorn,
python-multipart and prometheus-client. Nothing else in mmret imports this package.
"""

from mmret.server.app import create_app
from mmret.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
