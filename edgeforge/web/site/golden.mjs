// The page's smoke and bench modes. The golden check is edgeforge/runtime/golden_check.py's, in
// JavaScript: teacher-forced golden tokens; a step passes when the golden top-8 logits match within
// rel x (max - min) and the argmax is the golden token or a near-tie of it. The result has the same
// keys as the Python smoke result, so `edgeforge smoke` prints it with the same describe().
import { argmax, fetchVerifiedJson } from "./engine.mjs";

const f32 = Math.fround;

export function compareStep(logits, step, expected, rel) {
  const ids = step.top_ids, want = step.top_logits.map(f32);
  const tol = rel * (step.max - step.min);
  const finite = logits.every(Number.isFinite);
  const err = finite ? Math.max(...ids.map((id, k) => Math.abs(logits[id] - want[k]))) : Infinity;
  const pick = finite ? argmax(logits) : -1;
  const agree = pick === expected;
  let nearTie = false;
  if (!agree && ids.includes(pick)) {
    const gap = ids.includes(expected) ? want[ids.indexOf(expected)] - want[ids.indexOf(pick)] : Infinity;
    nearTie = gap <= tol;
  }
  return { ok: finite && err <= tol && (agree || nearTie), err, tol, agree, pick };
}

export async function runPrompt(engine, prompt, rel) {
  const tokens = prompt.tokens;
  engine.reset();
  const t0 = performance.now();
  let logits = await engine.prefill(prompt.prompt_ids);
  const t1 = performance.now();
  const steps = [compareStep(logits, prompt.steps[0], tokens[0], rel)];
  for (let i = 1; i < tokens.length; i++) {
    logits = await engine.decode(tokens[i - 1]);
    steps.push(compareStep(logits, prompt.steps[i], tokens[i], rel));
  }
  const t2 = performance.now();
  const bad = steps.findIndex((s) => !s.ok);
  return {
    text: prompt.text || "", ok: steps.every((s) => s.ok),
    max_err: Math.max(...steps.map((s) => s.err)), tol: Math.min(...steps.map((s) => s.tol)),
    agree: steps.filter((s) => s.agree).length, steps: steps.length,
    picked: steps.map((s) => s.pick), expected: [...tokens], first_bad_step: bad < 0 ? null : bad,
    step_errs: steps.map((s) => s.err), prompt_tokens: prompt.prompt_ids.length, prefill_s: (t1 - t0) / 1000,
    decode_tokens: tokens.length - 1, decode_s: (t2 - t1) / 1000,
  };
}

export function summarize(results) {
  const sum = (key) => results.reduce((s, r) => s + r[key], 0);
  const prefill = sum("prefill_s"), decode = sum("decode_s"), steps = sum("steps");
  return {
    status: results.every((r) => r.ok) ? "PASS" : "FAIL",
    max_logit_err: Math.max(...results.map((r) => r.max_err)),
    tolerance: Math.min(...results.map((r) => r.tol)),
    token_agreement: steps ? sum("agree") / steps : 0,
    tokens_agree: sum("agree"), tokens_total: steps,
    prefill_tok_s: prefill ? sum("prompt_tokens") / prefill : null,
    decode_tok_s: decode ? sum("decode_tokens") / decode : null,
  };
}

// The tolerance for this execution provider (golden.json's per-EP table, else its one rel).
export function toleranceFor(golden, ep) {
  const t = golden.tolerance || {};
  return Number((t.per_ep && t.per_ep[ep]) ?? t.rel);
}

export async function smoke({ base, manifest, engine, tokenizer, ep, log, maxPrompts }) {
  const golden = await fetchVerifiedJson(base, manifest, "golden.json");
  if (golden.format !== "edgeforge-golden" || !golden.prompts?.length) throw new Error("golden.json: not an edgeforge golden file");
  const prompts = maxPrompts ? golden.prompts.slice(0, maxPrompts) : golden.prompts;
  for (const p of prompts) {  // the page's tokenizer must give the build's prompt ids
    const ids = p.chat ? tokenizer.encodeChat([{ role: "user", content: p.text }]) : tokenizer.encode(p.text);
    if (JSON.stringify(ids) !== JSON.stringify(p.prompt_ids)) {
      return { status: "FAIL", error: `tokenizer/: the page encodes golden prompt ${JSON.stringify(p.text)} differently than at build time` };
    }
  }
  const rel = toleranceFor(golden, ep);
  const results = [];
  for (const [i, p] of prompts.entries()) {
    const r = await runPrompt(engine, p, rel);
    results.push(r);
    log(`prompt ${i + 1}/${prompts.length}: ${r.ok ? "ok" : "BAD"}, max err ${r.max_err.toPrecision(4)}, ` +
        `${r.agree}/${r.steps} tokens agree (${(r.prefill_s + r.decode_s).toFixed(1)} s)`);
  }
  return { ...summarize(results), prompts: results, prompts_checked: results.length, prompts_total: golden.prompts.length };
}

// pp/tg like llama-bench (edgeforge/bundle/bench.py): ppN is one prefill of N tokens from an empty
// cache, tgN is N decode steps after a one-token prefill; one warm-up of each first (WebGPU compiles
// its shaders then). Returns the seconds of every repetition.
export async function bench({ engine, pp, tg, reps, log }) {
  const vocab = engine.info.vocab_size;
  const ids = Array.from({ length: Math.max(pp, 1) }, (_, i) => (i * 7919 + 13) % vocab);
  const timePp = async () => {
    engine.reset();
    const t = performance.now();
    await engine.prefill(ids);
    return (performance.now() - t) / 1000;
  };
  const timeTg = async (n) => {
    engine.reset();
    let logits = await engine.prefill([ids[0]]);
    const t = performance.now();
    for (let i = 0; i < n; i++) logits = await engine.decode(argmax(logits));
    return (performance.now() - t) / 1000;
  };
  const out = { pp, tg, reps, pp_s: [], tg_s: [] };
  if (pp) {
    await timePp();
    for (let r = 0; r < reps; r++) out.pp_s.push(await timePp());
    log(`pp${pp}: ${out.pp_s.map((s) => (pp / s).toFixed(1)).join(", ")} tok/s`);
  }
  if (tg) {
    await timeTg(Math.min(tg, 4));
    for (let r = 0; r < reps; r++) out.tg_s.push(await timeTg(tg));
    log(`tg${tg}: ${out.tg_s.map((s) => (tg / s).toFixed(1)).join(", ")} tok/s`);
  }
  return out;
}
