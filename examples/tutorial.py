"""The seed tutorial's In[16] cell, unchanged except for the imports and the model loading.

The tutorial loads Qwen2.5-3B-Instruct with transformers; here `model_instruct` is rolechat's
embedded model (the tokenizer is part of a rolechat engine, so it is None). Run:

    .venv/bin/python examples/tutorial.py
"""

from rolechat import chat_turn, load_engine

model_instruct = load_engine()
tokenizer_instruct = None

history=[]

prompt_1="我想学做一道最简单的家常菜"
response=chat_turn(model_instruct,tokenizer_instruct,history,prompt_1)
history=response['history']
print(response['response']+'\n')

prompt_2="能再具体点吗？比如火候。"
response=chat_turn(model_instruct,tokenizer_instruct,history,prompt_2)
history=response['history']
print(response['response']+'\n')

prompt_3="我不吃糖，怎么办？"
response=chat_turn(model_instruct,tokenizer_instruct,history,prompt_3)
history=response['history']
print(response['response']+'\n')
