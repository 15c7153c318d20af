// The bundle's engine in the browser: what edgeforge/runtime/onnx_engine.py and embedding.py do,
// on onnxruntime-web (WebGPU EP, or WASM EP where the browser has no WebGPU).
//
// Every file is fetched once, checked against manifest.json (size and sha256 with WebCrypto) and
// only then used: the graph and its data file are handed to onnxruntime-web as bytes, the WASM
// binary too (env.wasm.wasmBinary), so what runs is exactly what was checked.
import * as ort from "./vendor/ort.webgpu.min.mjs";

export { ort };

// ---- verification -------------------------------------------------------------------------------
export class BundleError extends Error {}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256(bytes) {
  if (!globalThis.crypto || !crypto.subtle) {
    // WebCrypto exists only in a secure context: https, or http on localhost / 127.0.0.1.
    throw new BundleError("this page needs a secure context (https, or http://localhost) to verify the bundle " +
                          "with WebCrypto; see the bundle's README (Phones)");
  }
  return hex(await crypto.subtle.digest("SHA-256", bytes));
}

export async function loadManifest(base) {
  const res = await fetch(new URL("manifest.json", base), { cache: "no-store" });
  if (!res.ok) throw new BundleError(`manifest.json: HTTP ${res.status}`);
  const manifest = await res.json();
  if (manifest.format !== "edgeforge-bundle" || typeof manifest.files !== "object") {
    throw new BundleError("manifest.json: not an edgeforge bundle manifest");
  }
  return manifest;
}

// Fetch one listed file and check its size and sha256; returns its bytes (Uint8Array).
export async function fetchVerified(base, manifest, path) {
  const entry = manifest.files[path];
  if (!entry) throw new BundleError(`${path}: not listed in manifest.json`);
  const res = await fetch(new URL(path, base), { cache: "no-store" });
  if (!res.ok) throw new BundleError(`${path}: HTTP ${res.status}`);
  const bytes = new Uint8Array(await res.arrayBuffer());
  if (bytes.byteLength !== entry.size) {
    throw new BundleError(`${path}: ${bytes.byteLength} bytes, manifest.json says ${entry.size} (modified or corrupt)`);
  }
  if ((await sha256(bytes)) !== entry.sha256) {
    throw new BundleError(`${path}: sha256 does not match manifest.json (modified or corrupt)`);
  }
  return bytes;
}

export async function fetchVerifiedJson(base, manifest, path) {
  return JSON.parse(new TextDecoder().decode(await fetchVerified(base, manifest, path)));
}

// Every file the manifest lists (the smoke mode's first step); returns how many.
export async function verifyAll(base, manifest, progress = () => {}) {
  const paths = Object.keys(manifest.files).sort();
  for (const [i, path] of paths.entries()) {
    await fetchVerified(base, manifest, path);
    progress(`verified ${i + 1}/${paths.length}: ${path}`);
  }
  return paths.length;
}

// ---- execution provider -------------------------------------------------------------------------
// "webgpu" when the browser gives a WebGPU adapter, else "wasm"; `want` forces one ("webgpu" with
// no adapter is an error, never a silent fallback). Returns {ep, adapter, why}.
export async function pickProvider(want = "auto") {
  let adapter = null, why = "";
  if (!("gpu" in navigator)) why = "this browser has no WebGPU (navigator.gpu is missing)";
  else {
    try {
      adapter = await navigator.gpu.requestAdapter();
      if (!adapter) why = "navigator.gpu.requestAdapter() returned no adapter";
    } catch (err) {
      why = `navigator.gpu.requestAdapter() failed: ${err}`;
    }
  }
  const info = adapter ? adapterName(adapter) : null;
  if (want === "webgpu" && !adapter) throw new BundleError(`WebGPU requested but unavailable: ${why}`);
  const ep = want === "wasm" ? "wasm" : adapter ? "webgpu" : "wasm";
  return { ep, adapter: info, why: ep === "wasm" && want !== "wasm" ? why : "" };
}

function adapterName(adapter) {
  const i = adapter.info || {};
  return [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(" ") || "unknown adapter";
}

// ---- embedding rows from the data file (runtime/embedding.py) -----------------------------------
const ZERO_POINT = { 4: 8, 8: 128 };

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

export class EmbeddingTable {
  constructor(spec, files, vocab, hidden) {
    this.vocab = vocab;
    this.hidden = hidden;
    this.kind = spec.kind;
    const tensor = (t) => {
      const bytes = files[t.file];
      if (!bytes) throw new BundleError(`artifact.json: embedding file ${t.file} is not the graph's data file`);
      if (t.offset < 0 || t.offset + t.length > bytes.byteLength) {
        throw new BundleError(`artifact/${t.file}: the embedding table is not inside the file`);
      }
      return { view: new DataView(bytes.buffer, bytes.byteOffset + t.offset, t.length), rowBytes: t.length / t.shape[0], dtype: t.dtype };
    };
    if (this.kind === "quantized") {
      this.bits = spec.bits;
      this.block = spec.block_size;
      if (!ZERO_POINT[this.bits] || hidden % this.block) throw new BundleError(`artifact.json: embedding bits ${this.bits} not supported`);
      this.blob = tensor(spec.blob);
      this.scales = tensor(spec.scales);
    } else if (this.kind === "dense") {
      this.table = tensor(spec.table);
    } else {
      throw new BundleError(`artifact.json: embedding kind ${this.kind} is neither quantized nor dense`);
    }
  }

  // float32 [ids.length * hidden]: float32(q - zero point) * scale, per block of 32
  rows(ids) {
    const H = this.hidden, out = new Float32Array(ids.length * H);
    ids.forEach((id, r) => {
      if (!(id >= 0 && id < this.vocab)) throw new BundleError(`token id ${id} is outside the vocabulary (0..${this.vocab - 1})`);
      if (this.kind === "dense") return this.denseRow(id, out, r * H);
      const blob = this.blob, zp = ZERO_POINT[this.bits], b0 = id * blob.rowBytes, s0 = id * this.scales.rowBytes;
      for (let j = 0; j < H; j++) {
        const byte = blob.view.getUint8(b0 + (this.bits === 8 ? j : j >> 1));
        const q = this.bits === 8 ? byte : j & 1 ? byte >> 4 : byte & 0x0f;
        const scale = this.scales.view.getFloat32(s0 + 4 * Math.floor(j / this.block), true);
        out[r * H + j] = Math.fround((q - zp) * scale);
      }
    });
    return out;
  }

  denseRow(id, out, at) {
    const t = this.table, base = id * t.rowBytes;
    for (let j = 0; j < this.hidden; j++) {
      out[at + j] = t.dtype === "float16" ? halfToFloat(t.view.getUint16(base + 2 * j, true)) : t.view.getFloat32(base + 4 * j, true);
    }
  }
}

const WEBGPU_EXACT_POSITIONS = 8;

// ---- the engine ---------------------------------------------------------------------------------
// reset() / prefill(ids) / decode(token) -> Float32Array [vocab] logits, like the Python engines.
// The KV cache is the classic layout ("copy" in onnx_engine.py): past = the previous presents. On
// WebGPU the presents stay in GPU buffers between steps (preferredOutputLocation), so a step moves
// only the embeddings in and the logits out.
export class Engine {
  static async open({ base, manifest, ep, threads, log = () => {} }) {
    const artifact = await fetchVerifiedJson(base, manifest, "artifact/artifact.json");
    const info = artifact.onnx;
    if (!info || info.input !== "inputs_embeds") throw new BundleError("artifact/artifact.json: not a web ONNX artifact");
    const wasm = await fetchVerified(base, manifest, "web/vendor/ort-wasm-simd-threaded.asyncify.wasm");
    ort.env.wasm.wasmBinary = wasm;
    ort.env.wasm.wasmPaths = new URL("web/vendor/", base).href;
    ort.env.wasm.numThreads = threads ?? (globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
    ort.env.logLevel = "error";
    const model = await fetchVerified(base, manifest, `artifact/${info.model}`);
    const dataName = `${info.model}.data`;
    const data = await fetchVerified(base, manifest, `artifact/${dataName}`);
    log(`checked ${info.model} and ${dataName} (${(data.byteLength / 2 ** 20).toFixed(1)} MiB)`);
    const names = Array.from({ length: info.num_layers }, (_, i) => [`present.${i}.key`, `present.${i}.value`]).flat();
    const options = {
      executionProviders: [ep],
      graphOptimizationLevel: "all",
      externalData: [{ path: dataName, data }],
      logSeverityLevel: 3,
    };
    if (ep === "webgpu") options.preferredOutputLocation = Object.fromEntries(names.map((n) => [n, "gpu-buffer"]));
    const t0 = performance.now();
    let session;
    try {
      session = await ort.InferenceSession.create(model, options);
    } catch (err) {
      throw new BundleError(`artifact/${info.model}: onnxruntime-web could not load it on ${ep}: ${err.message || err}`);
    }
    log(`session on ${ep} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const embeddings = new EmbeddingTable(info.embedding, { [dataName]: data }, info.vocab_size, info.hidden_size);
    return new Engine(session, info, embeddings, ep);
  }

  constructor(session, info, embeddings, ep) {
    this.session = session;
    this.info = info;
    this.embeddings = embeddings;
    this.device = ep;
    this.kvType = info.kv_dtype === "float16" ? "float16" : "float32";
    this.maxLength = info.context_length;
    // onnxruntime-web's WebGPU GroupQueryAttention (float32; 1.31.1, and onnxruntime-webgpu 1.27)
    // gets every row at position 8 or later of a multi-token run wrong (0.03-0.28 off, on SwiftShader
    // and on lavapipe), while single-token runs are exact: there the prompt goes in as positions 0-7
    // in one run, then one token a run (docs/notes/web.md). WASM takes the whole prompt at once.
    this.exactRun = ep === "webgpu" ? WEBGPU_EXACT_POSITIONS : Infinity;
    this.past = null;
    this.reset();
  }

  reset() {
    this.dispose();
    const { num_layers: L, num_kv_heads: K, head_dim: D } = this.info;
    const empty = () => new ort.Tensor(this.kvType, this.kvType === "float16" ? new Uint16Array(0) : new Float32Array(0), [1, K, 0, D]);
    this.past = {};
    for (let i = 0; i < L; i++) {
      this.past[`past_key_values.${i}.key`] = empty();
      this.past[`past_key_values.${i}.value`] = empty();
    }
    this.length = 0;
  }

  dispose() {
    if (!this.past) return;
    for (const t of Object.values(this.past)) if (t.location === "gpu-buffer") t.dispose();
    this.past = null;
  }

  async prefill(ids) {
    if (!ids.length) throw new BundleError("prefill needs at least one token");
    let logits;
    for (let i = 0; i < ids.length;) {
      const n = Math.max(1, Math.min(ids.length - i, this.exactRun - this.length));
      logits = await this.step(ids.slice(i, i + n));
      i += n;
    }
    return logits;
  }

  async decode(token) {
    return this.step([token]);
  }

  async step(ids) {
    const total = this.length + ids.length;
    if (total > this.maxLength) throw new BundleError(`a sequence of ${total} tokens exceeds the context length ${this.maxLength}`);
    const feeds = {
      inputs_embeds: new ort.Tensor("float32", this.embeddings.rows(ids), [1, ids.length, this.info.hidden_size]),
      seqlens_k: new ort.Tensor("int32", Int32Array.of(total - 1), [1]),
      total_sequence_length: new ort.Tensor("int32", Int32Array.of(total), []),
      ...this.past,
    };
    const out = await this.session.run(feeds);
    const old = this.past;
    this.past = {};
    for (let i = 0; i < this.info.num_layers; i++) {
      this.past[`past_key_values.${i}.key`] = out[`present.${i}.key`];
      this.past[`past_key_values.${i}.value`] = out[`present.${i}.value`];
    }
    for (const t of Object.values(old)) if (t.location === "gpu-buffer") t.dispose();
    this.length = total;
    const logits = out.logits.location === "cpu" ? out.logits.data : await out.logits.getData();
    return Float32Array.from(logits);
  }
}

// ---- sampling (runtime/sampling.py: greedy at temperature 0, else temperature + top-p) ----------
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class Sampler {
  constructor({ temperature = 0, topP = 1, seed = 0 } = {}) {
    if (!(temperature >= 0)) throw new BundleError(`temperature must be >= 0, got ${temperature}`);
    if (!(topP > 0 && topP <= 1)) throw new BundleError(`top_p must be in (0, 1], got ${topP}`);
    Object.assign(this, { temperature, topP, random: mulberry32(seed) });
  }

  sample(logits) {
    if (this.temperature === 0) return argmax(logits);
    let max = -Infinity;
    for (const x of logits) max = Math.max(max, x);
    const probs = Array.from(logits, (x, i) => [Math.exp((x - max) / this.temperature), i]);
    const sum = probs.reduce((s, [p]) => s + p, 0);
    probs.sort((a, b) => b[0] - a[0]);
    let kept = [], mass = 0;
    for (const [p, i] of probs) {
      kept.push([p / sum, i]);
      mass += p / sum;
      if (mass >= this.topP) break;
    }
    let r = this.random() * mass;
    for (const [p, i] of kept) if ((r -= p) <= 0) return i;
    return kept[kept.length - 1][1];
  }
}
