"""DICOMweb's QIDO-RS and WADO-RS over everything cadnode holds, under /dicomweb on the HTTP port.

    viewer --QIDO-RS--> search.py  (query parameters -> the C-FIND identifier, query.find)
           --WADO-RS--> wado.py    (instances, metadata, frames, bulk data)
                        routes.py  (the FastAPI routes, CORS)

What is held is what C-FIND and C-MOVE see: the received images and the node's own results
(SR, SEG), through the query index (cadnode/serve/index.py).
"""

from cadnode.serve.dicomweb.routes import Cors, router

__all__ = ["Cors", "router"]
