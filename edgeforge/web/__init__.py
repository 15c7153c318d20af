"""The `web` target: a bundle that is a static site running onnxruntime-web in a browser.

site/       the page (index.html, app.mjs, engine.mjs, ...) copied into every web bundle
assets.py   the pinned npm packages and the dist files a bundle ships (copied from the toolchain)
layout.py   the web bundle's extra files (site + vendor/) instead of the Python runtime
server.py   serve_static(): the headers WASM threads need (COOP/COEP) and the right MIME types
browser.py  headless Chromium (Playwright, system binary) running the page's smoke and bench modes
"""

# npm packages the page uses, pinned: the toolchain installs exactly these (edgeforge toolchains
# install web) and the manifest records them (runtime_requirements).
NPM_PACKAGES = {
    "onnxruntime-web": "1.31.1",
    "@huggingface/tokenizers": "0.2.0",
    "@huggingface/jinja": "0.5.13",
}
