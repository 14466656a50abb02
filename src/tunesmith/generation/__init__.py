"""Generation: greedy replies to conversations (``generate``) and the base model's cached replies
to general instructions (``replies``), used by evaluation, forgetting checks and replay."""
