"""Write a tiny word-level Hugging Face tokenizer to a folder, for peers that insist on a tokenizer.

AIPerf and GuideLLM tokenize their synthetic prompts client-side and would otherwise download one (a
Hugging Face repo, or tiktoken's BPE file), which this benchmark's network does not allow. One token per
common English word, whitespace pre-tokenization: prompt lengths in tokens equal words. Run with a Python
that has ``tokenizers`` (the peers' venvs do): ``python loadgen_tokenizer.py OUTDIR``.
"""
import json
import sys
from pathlib import Path

WORDS = """the of and to in is was for on that with as by at from his her he she it they we you are were be
been has have had not but or an this which their there one all would will can who more when if out so up
said what its about than into them only other new some could time these two may then do first any my now
such like our over man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last might
us great old year off come since against go came right used take three place small found part again home
head house water room mother night area money story young fact month lot study book eye job word business
issue side kind four five six seven eight nine ten hand point city play give turn move live feel show hold
bring begin keep start run write read talk stand hear let mean set meet pay sit speak lie lead grow lose
fall send build stay reach learn open walk win offer remember love consider appear buy wait serve die
expect stop close break spend create drive return hope watch""".split()

if __name__ == "__main__":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in dict.fromkeys(WORDS):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 1000000}))
    (out / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "bos_token": "<s>",
                                                             "eos_token": "</s>"}))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(vocab)}))
    print(out)
