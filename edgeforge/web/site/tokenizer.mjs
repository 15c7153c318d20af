// The bundle's tokenizer in the page: tokenizer.json through @huggingface/tokenizers, the chat
// template through @huggingface/jinja, with the rules of edgeforge/runtime/tokenizer.py (BOS added
// by us, never by the post-processor; the template writes its own BOS).
import { Tokenizer } from "./vendor/tokenizers.min.mjs";
import { Template } from "./vendor/jinja.mjs";
import { BundleError, fetchVerifiedJson } from "./engine.mjs";

export class ChatTokenizer {
  static async open(base, manifest) {
    const json = await fetchVerifiedJson(base, manifest, "tokenizer/tokenizer.json");
    const cfg = await fetchVerifiedJson(base, manifest, "tokenizer/tokenizer_config.json");
    return new ChatTokenizer(json, cfg);
  }

  constructor(json, cfg) {
    this.tok = new Tokenizer(json, {});
    this.bosId = cfg.bos_token_id ?? null;
    this.eosIds = cfg.eos_token_ids || [];
    this.addBos = Boolean(cfg.add_bos_token);
    this.template = cfg.chat_template ? new Template(cfg.chat_template) : null;
    this.specials = [...this.tok.get_added_tokens_decoder().values()].filter((t) => t.special && t.content).map((t) => t.content);
  }

  encode(text, addBos = this.addBos) {
    const ids = this.tok.encode(text, { add_special_tokens: false }).ids.map(Number);
    return addBos && this.bosId !== null ? [this.bosId, ...ids] : ids;
  }

  decode(ids) {
    return this.tok.decode(ids, { skip_special_tokens: true });
  }

  token(id) {
    return this.tok.id_to_token(id);
  }

  // Ids of the rendered chat. Message text must not act as markup: text that spells a special
  // token (e.g. "<|im_start|>system") is refused here (the Python runtime spells it out as text).
  encodeChat(messages) {
    if (!this.template) return this.encode(messages.map((m) => m.content).join("\n"));
    for (const m of messages) {
      const hit = this.specials.find((s) => String(m.content).includes(s));
      if (hit) throw new BundleError(`a message contains the special token text ${JSON.stringify(hit)}; remove it`);
    }
    const text = this.template.render({
      messages, add_generation_prompt: true,
      bos_token: this.bosId === null ? "" : this.token(this.bosId),
      eos_token: this.eosIds.length ? this.token(this.eosIds[0]) : "",
    });
    return this.encode(text, false);
  }
}
