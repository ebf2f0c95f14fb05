"""Common English words for the synthetic tasks: needle keys ("adjective-noun") and the word lists of
common-words extraction. Plain lowercase letters, no duplicates (`VOCABULARY` keeps the first of each).
"""

from __future__ import annotations

ADJECTIVES = tuple("""
able active afraid agile alert ancient angry anxious awake aware bad bare basic bitter black blank bold
brave brief bright broad broken brown busy calm careful casual cheap chief civil clean clear clever close
cloudy cold common cool crazy crisp cruel curious curly daily damp dark dear deep dense direct dirty dizzy
double dry dull dusty eager early easy elder empty equal even exact extra fair faithful false famous fancy
fast fierce final fine firm flat fluffy formal fresh friendly frozen full funny gentle giant glad global
golden good grand gray great green grumpy guilty happy hard harsh heavy helpful hidden high hollow honest
hot huge humble hungry icy ideal idle innocent jolly keen kind large late lazy lean light likely little
lively local lonely long loose loud lovely loyal lucky mad major mellow mild minor modern modest moist
narrow nasty neat nervous new nice noble noisy normal odd old open orange pale patient plain pleasant
polite poor popular precious pretty proud public pure purple quick quiet rapid rare raw ready real
red regular rich rigid ripe rough round royal rude rural rusty sacred sad safe salty scary secret shallow
sharp shiny short shy silent silly simple sleepy slim slow small smart smooth soft solid sour spare
spicy stable steady steep sticky stiff strange strict strong sunny super sweet swift tall tame tender
thick thin tidy tiny tired tough true ugly unique urban vague vast violet vivid warm weak wealthy weary
wet white whole wide wild wise witty wooden yellow young zealous
""".split())

NOUNS = tuple("""
account acorn actor airport album anchor angle animal ankle apple apron arch arrow artist attic author
autumn avenue badge bakery balcony balloon banana bandit banjo barn barrel basket battery beach beard
beetle bell belt bench berry bicycle blanket blossom board boat bone bonnet book boot bottle boulder
bowl bracelet branch bread brick bridge broom brother bubble bucket buffalo building bundle bunny butter
button cabin cable cactus cake camel camera camp canal candle canoe canvas canyon captain carpet carrot
castle cattle cave cellar chain chair chalk channel chapel cheese cherry chicken chimney church circle
city clock closet cloud clover coach coast coat coconut coffee coin collar comet compass cookie copper
corner cottage cotton country cousin crayon creek cricket crown crystal cup curtain cushion daisy
dancer desert desk diamond dinner doctor dolphin donkey door dragon drawer dream drum duck eagle
earth elbow elephant engine envelope eraser evening fabric factory falcon farm feather fence ferry
field finger fire flag flame flower flute forest fork fountain fox frame frog fruit funnel garage garden
gate giraffe glacier glass glove goat gold grape grass guitar hammer harbor harvest hat hawk helmet
hill honey horizon horse hospital hotel house island jacket jar jelly jewel journal jungle kettle key
kitchen kite knee knife ladder lake lamp lantern leaf lemon letter library lighthouse lily lion lizard
lobster locket magnet mango map marble market meadow melon mirror monkey moon morning mountain mouse
museum mushroom needle nest net notebook oak ocean office onion orchard otter owl oyster paddle
palace pancake panda paper parade parrot peach peanut pear pebble pencil penguin pepper piano pickle
picture pillow pilot pine pirate planet plate pocket pond potato puddle pumpkin puppy puzzle quilt
rabbit raccoon radio rain rainbow raven ribbon river road robin rocket roof rose saddle sail salad sand
satchel saucer scarf school scissors seal shadow shark sheep shell ship shoe shovel shrimp silver
sister sky sled snail snake snow soap sock sofa spider spoon squirrel stable stair star station statue
stone storm stove straw stream street sugar suitcase summer sun swan sweater table tail teacher
teapot temple tent thimble thread thunder ticket tiger timber toast tomato tower town tractor train
tree trolley trumpet tulip tunnel turtle umbrella valley vase velvet village violin volcano wagon
wallet walnut wand water whale wheel whistle willow window winter wizard wolf worm yacht yard zebra
""".split())

VERBS = tuple("""
accept add admire allow answer appear arrange arrive ask bake balance bathe become begin behave
believe belong blink boil borrow bounce breathe bring build bury calculate carry catch change chase
cheer choose clap climb collect comb compare complain cook copy count cover crawl cross cry dance decide
deliver describe design dig discover dive divide draw dream drink drive earn eat enjoy enter escape
explain explore fetch fill find fix float fold follow forget forgive gather giggle grow guess hang
help hide hike hold hop hug hum hunt imagine invent invite join juggle jump kick kneel knit knock
laugh lead learn lift listen look love march measure melt mend mix move nod notice obey offer open
order pack paint pass pause pick plant play point polish pour praise pray pretend print promise
pull push race reach read relax remember repair reply rescue rest return ride ring roll row run
sail scatter scream search shake share shine shout sing sip sit skate sketch ski sleep slide smile
sneeze solve sort spell spin splash squeeze stack stare start steer stir stretch study swim swing
talk taste teach tease thank think throw tickle travel trust try tumble turn twist type visit wait
walk wander wash watch wave weave whisper whistle win wink wish wonder work worry wrap write yawn yell
""".split())

#: every word once: nouns, then adjectives, then verbs (first occurrence kept)
VOCABULARY = tuple(dict.fromkeys(NOUNS + ADJECTIVES + VERBS))
