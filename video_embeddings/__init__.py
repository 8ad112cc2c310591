"""The stages behind the ``VideoEmbedding`` UDF, one concern per module, in pipeline order:

- ``settings``: every setting, read from the environment in one place;
- ``outcomes``: what a row can end as (embedded, bad video, object fault, system fault);
- ``urls``: which URLs may be read, and redaction of URLs in messages;
- ``storage``: opening an object on its fsspec filesystem, with retries;
- ``decode``: sampling and decoding frames, on the CPU and on NVDEC;
- ``preprocess``: the checkpoint's video processor as tensor operations;
- ``model``: loading V-JEPA2, embedding and pooling;
- ``rows``: the Arrow column and the zero tensor;
- ``pipeline``: a batch of URLs through decode and model, one outcome per row;
- ``aggregate``: one vector per video, at search time.

``video_embeddings_udf`` wires them into the Geneva UDF.
"""
