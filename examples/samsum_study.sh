#!/usr/bin/env bash
# The guide's case study, on SAMSum dialogue summaries: fine-tune, then let people judge base vs
# tuned blind, add an LLM judge answering through a local OpenAI-compatible endpoint, and read one
# report: who won, how sure, whether the raters agreed, whether ROUGE/BLEU/chrF and the judge agree
# with the people.   Run from the repository root:  bash examples/samsum_study.sh
set -euo pipefail
T=${TUNESMITH:-.venv/bin/tunesmith}
PORT=${JUDGE_PORT:-8011}

# 1. base vs tuned on 40 held-out dialogues (~6 min on a laptop CPU)
[ -f runs/samsum-lora/eval.json ] || $T train examples/samsum.yaml

# 2. a study of 20 test dialogues, both systems' summaries stored once; three invited raters
$T study create runs/samsum-lora --base --examples 20 --criteria relevance,engagement,quality \
    --ratings-per-pair 3 --raters ann,bob,cy --name samsum --overwrite

# 3. the LLM judge: here the base model behind `tunesmith serve` (any OpenAI-compatible endpoint
#    works: --base-url https://api.openai.com/v1 --model gpt-4o with OPENAI_API_KEY set)
$T serve runs/samsum-lora --port "$PORT" > /tmp/tunesmith-judge-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
$T study judge studies/samsum --base-url "http://127.0.0.1:$PORT/v1" --model SmolLM2-135M-Instruct
kill $SERVER

# 4. the people: start the rating app and send each rater their link (printed here)
echo "Now run:  $T study serve studies/samsum   and send ann, bob and cy their links."
echo "When they are done (or any time before):  $T study report studies/samsum"
$T study report studies/samsum
