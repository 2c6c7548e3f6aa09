# rewardfleet image for KubeRay (RayJob / RayService): Ray's GPU base image plus this package and its pinned stack.
#   docker build -t rewardfleet:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users protos protos
COPY --chown=ray:users services services
COPY --chown=ray:users trainer trainer
COPY --chown=ray:users deploy deploy
# The vllm extra serves the semantic reward's LLM on GPUs.
RUN pip install --no-cache-dir -e '.[vllm]'
ENV HF_HUB_ENABLE_HF_TRANSFER=0 RAY_USAGE_STATS_ENABLED=0
