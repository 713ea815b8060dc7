"""python -m srpo_core.server --model PATH [--host 127.0.0.1] [--port 8000] [--engine hf|vllm]"""

import sys

from srpo_core.server.app import main

sys.exit(main())
