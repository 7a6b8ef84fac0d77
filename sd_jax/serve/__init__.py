"""``sd-jax serve``: an HTTP server that batches concurrent requests onto the devices.

* :mod:`sd_jax.serve.worker`: the batching worker thread over the library's Dispatcher;
* :mod:`sd_jax.serve.a1111`: the AUTOMATIC1111 API's fields mapped onto sd-jax requests;
* :mod:`sd_jax.serve.app`: the FastAPI app (A1111 API, native API, health, metrics, web page);
* :mod:`sd_jax.serve.run`: the command (model load, precompilation, uvicorn, graceful stop).
"""
