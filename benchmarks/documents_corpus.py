"""A small retrieval test set from public-domain texts: passages, and questions answered by one passage each.

English: openings and famous lines of 19th-century novels, speeches and older works (public
domain; translations of Tolstoy and Sun Tzu are Garnett's and Giles's). Chinese: 《论语》, 《道德经》,
《孟子》. Questions are paraphrased (few shared words) so lexical and dense search are both tested;
`key` is a phrase only the right passage contains.
"""

ENGLISH = {
    "Pride and Prejudice": "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.",
    "A Tale of Two Cities": "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before "
    "us, we had nothing before us.",
    "Moby-Dick": "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world. It is a way I have of driving off the spleen and regulating the circulation.",
    "Gettysburg Address": "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a "
    "great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure.",
    "Declaration of Independence": "We hold these truths to be self-evident, that all men are created equal, that they "
    "are endowed by their Creator with certain unalienable Rights, that among these are Life, Liberty and the "
    "pursuit of Happiness. That to secure these rights, Governments are instituted among Men, deriving their just "
    "powers from the consent of the governed.",
    "Alice's Adventures in Wonderland": "Alice was beginning to get very tired of sitting by her sister on the bank, and "
    "of having nothing to do: once or twice she had peeped into the book her sister was reading, but it had no "
    "pictures or conversations in it, and what is the use of a book, thought Alice, without pictures or conversations?",
    "A Scandal in Bohemia": "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any "
    "other name. In his eyes she eclipses and predominates the whole of her sex. It was not that he felt any emotion "
    "akin to love for Irene Adler.",
    "Frankenstein": "It was on a dreary night of November that I beheld the accomplishment of my toils. With an anxiety "
    "that almost amounted to agony, I collected the instruments of life around me, that I might infuse a spark of "
    "being into the lifeless thing that lay at my feet.",
    "Hamlet": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them.",
    "On the Origin of Species": "There is grandeur in this view of life, with its several powers, having been "
    "originally breathed into a few forms or into one; and that, whilst this planet has gone cycling on according "
    "to the fixed law of gravity, from so simple a beginning endless forms most beautiful and most wonderful have "
    "been, and are being, evolved.",
    "Walden": "I went to the woods because I wished to live deliberately, to front only the essential facts of life, and "
    "see if I could not learn what it had to teach, and not, when I came to die, discover that I had not lived.",
    "Jane Eyre": "There was no possibility of taking a walk that day. We had been wandering, indeed, in the leafless "
    "shrubbery an hour in the morning; but since dinner the cold winter wind had brought with it clouds so sombre, "
    "and a rain so penetrating, that further out-door exercise was now out of the question.",
    "Anna Karenina": "Happy families are all alike; every unhappy family is unhappy in its own way. Everything was in "
    "confusion in the Oblonskys' house. The wife had discovered that the husband was carrying on an intrigue with a "
    "French girl, who had been a governess in their family.",
    "Genesis": "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, "
    "Let there be light: and there was light.",
    "The Art of War": "If you know the enemy and know yourself, you need not fear the result of a hundred battles. If you "
    "know yourself but not the enemy, for every victory gained you will also suffer a defeat. If you know neither "
    "the enemy nor yourself, you will succumb in every battle.",
}

CHINESE = {
    "论语·学而": "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？",
    "论语·为政 志学": "子曰：吾十有五而志于学，三十而立，四十而不惑，五十而知天命，六十而耳顺，七十而从心所欲，不逾矩。",
    "论语·为政 温故": "子曰：温故而知新，可以为师矣。",
    "论语·为政 学思": "子曰：学而不思则罔，思而不学则殆。",
    "论语·述而": "子曰：三人行，必有我师焉。择其善者而从之，其不善者而改之。",
    "论语·卫灵公": "子贡问曰：有一言而可以终身行之者乎？子曰：其恕乎！己所不欲，勿施于人。",
    "论语·里仁": "子曰：朝闻道，夕死可矣。",
    "论语·子罕": "子在川上曰：逝者如斯夫，不舍昼夜。",
    "道德经·第一章": "道可道，非常道；名可名，非常名。无名天地之始，有名万物之母。",
    "道德经·第八章": "上善若水。水善利万物而不争，处众人之所恶，故几于道。",
    "道德经·第三十三章": "知人者智，自知者明。胜人者有力，自胜者强。知足者富，强行者有志。",
    "道德经·第六十四章": "合抱之木，生于毫末；九层之台，起于累土；千里之行，始于足下。",
    "孟子·告子下": "故天将降大任于是人也，必先苦其心志，劳其筋骨，饿其体肤，空乏其身，行拂乱其所为，所以动心忍性，曾益其所不能。",
    "孟子·告子上": "鱼，我所欲也；熊掌，亦我所欲也；二者不可得兼，舍鱼而取熊掌者也。生，亦我所欲也；义，亦我所欲也；二者不可得兼，舍生而取义者也。",
}

# (question, key phrase of the passage that answers it)
QUESTIONS = [
    ("What does everyone assume a wealthy bachelor is looking for?", "in want of a wife"),
    ("Which era was described as both a spring of hope and a season of despair?", "winter of despair"),
    ("Why did the narrator with an empty purse decide to go to sea?", "watery part"),
    ("How long ago was the nation founded, according to the president's speech?", "Four score"),
    ("Where do rulers get their legitimate authority from?", "consent of the governed"),
    ("Why was the girl bored by the volume her sister was reading?", "without pictures"),
    ("What did the detective call the one lady who outwitted him?", "always the woman"),
    ("In which month did the scientist animate his creature?", "November"),
    ("What choice does the prince weigh about enduring misfortune?", "sea of troubles"),
    ("What did the naturalist say has evolved from a simple start?", "endless forms"),
    ("Why did the writer go to live in the forest?", "live deliberately"),
    ("Why couldn't the children go outdoors after the meal?", "rain so penetrating"),
    ("What scandal upset the household of the Oblonskys?", "French girl"),
    ("What covered the deep before light was made?", "darkness was upon"),
    ("What happens to a general who understands neither his foe nor himself?", "succumb in every battle"),
    ("朋友从很远的地方来看我，是什么心情？", "有朋自远方来"),
    ("孔子在几岁的时候不再感到困惑？", "四十而不惑"),
    ("怎样才能做别人的老师？", "温故而知新"),
    ("只读书而不思考会有什么后果？", "学而不思则罔"),
    ("几个人一起走路，其中一定有可以当老师的人？", "三人行"),
    ("自己不愿意的事情，应该怎样对待别人？", "己所不欲"),
    ("早上懂得了真理，晚上死去也可以吗？", "朝闻道"),
    ("孔子站在河边感叹时间像流水一样", "逝者如斯夫"),
    ("万物的母亲是什么？", "有名万物之母"),
    ("最高的善像什么东西？", "上善若水"),
    ("了解自己的人叫做什么？", "自知者明"),
    ("走一千里的路要从哪里开始？", "千里之行"),
    ("上天要把重大的责任交给一个人之前会怎样考验他？", "苦其心志"),
    ("生命和道义不能同时得到时应该选择哪个？", "舍生而取义"),
]
